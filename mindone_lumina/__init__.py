"""mindone-lumina: Lumina-Next (Next-DiT, Gemma-2B prompts, SDXL VAE, flow-matching sampler) in MindSpore."""

__version__ = "0.1.0"
