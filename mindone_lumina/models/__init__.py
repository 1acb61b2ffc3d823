"""The networks, as Cells only: no files, no sampler. ``dit_blocks`` holds what Next-DiT and Flag-DiT share."""
