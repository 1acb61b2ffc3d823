"""Hugging Face Gemma / LLaMA checkpoints of the prompt encoder. ``GemmaModel`` / ``LlamaModel`` names are the
project's; ``*ForCausalLM`` files prefix them with ``model.``. Gemma ties its LM head to the embeddings, so a stored
``lm_head.weight`` must be an exact copy of them; LLaMA's head (and the RoPE buffers old conversions stored) are
dropped, as ``AutoModel`` drops them."""

from ..text.decoder import DecoderConfig, DecoderEncoder
from .checkpoints import MultiFileCheckpoint, open_checkpoint
from .load import empty, load_specs, param_shapes
from .rules import RuleTable, convert_tensors

_LAYER_KEYS = (
    tuple(f"self_attn.{p}_proj.weight" for p in "qkvo")
    + tuple(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down"))
    + ("input_layernorm.weight", "post_attention_layernorm.weight")
)


def hf_rules(model_type: str) -> RuleTable:
    """``model.``-prefixed names -> the encoder's; Gemma's tied ``lm_head.weight`` is another copy of the embeddings."""
    embeddings = (
        ("model.embed_tokens.weight", "lm_head.weight") if model_type == "gemma" else ("model.embed_tokens.weight",)
    )
    return RuleTable(f"{model_type}-hf", (
        ("embed_tokens.weight", embeddings),
        *((f"layers.{{i}}.{k}", (f"model.layers.{{i}}.{k}",)) for k in _LAYER_KEYS),
        ("norm.weight", ("model.norm.weight",)),
    ))  # fmt: skip


def _not_in_llama_model(key: str) -> bool:
    return key == "lm_head.weight" or key.endswith("rotary_emb.inv_freq")


def load_decoder(folder: str, cfg: DecoderConfig, dtype) -> DecoderEncoder:
    """A ``DecoderEncoder`` with the weights of a Hugging Face folder (single or sharded safetensors or .bin), checked
    strictly from the file headers and filled one tensor at a time in ``dtype``."""
    reader = open_checkpoint(folder)
    if cfg.MODEL_TYPE == "llama":
        reader = MultiFileCheckpoint([reader], drop=_not_in_llama_model)
    table = hf_rules(cfg.MODEL_TYPE) if any(k.startswith("model.") for k in reader.keys()) else None
    encoder = empty(DecoderEncoder, cfg)
    try:
        specs = convert_tensors(reader, table, param_shapes(encoder), what="the checkpoint")
    except ValueError as e:
        raise ValueError(f"{folder}: weights do not fit {cfg}: {e}") from e
    return load_specs(encoder, specs, folder, dtype)
