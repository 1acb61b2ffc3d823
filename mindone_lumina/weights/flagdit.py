"""Flag-DiT (Lumina-T2I) checkpoints: the original Lumina-T2X layout and the project's safetensors, both with the
original names (there is no diffusers Flag-DiT); told apart from Next-DiT by the ``eol_token``."""

from ..models.flagdit import PRESETS, FlagDiT, FlagDiTConfig
from .dit import DiTWeights, Layout, fairscale_rows
from .rules import ShardTable

FLAGDIT = DiTWeights(
    name="Flag-DiT",
    config=FlagDiTConfig,
    model=FlagDiT,
    presets=PRESETS,
    model_names={"DiT_Llama_5B_patch2": "flagdit-5b"},  # Lumina-T2I: with --qk_norm, LLaMA-2-7B captions
    shards=ShardTable("flagdit-fairscale", fairscale_rows(("attention_norm", "ffn_norm"), ("eol_token", "pad_token"))),
    layouts=(Layout("original", None, "eol_token"),),
)
