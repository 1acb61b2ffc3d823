"""Whole folders: the diffusers / transformers pipeline layout (``diffusers_io``) and the components inside
mindone.diffusers pipelines (``mindone``)."""
