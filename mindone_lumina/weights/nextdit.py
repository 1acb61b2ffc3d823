"""Next-DiT checkpoints: the original Lumina-T2X layout (``consolidated[_ema].NN-of-MM.{safetensors,pth}``, the
project's own names) and diffusers ``LuminaNextDiT2DModel`` (spec section 7). diffusers stores ``wq`` and ``q_norm``
twice (``attn1``, ``attn2``): equal copies in converted checkpoints become the original's one query; copies that
differ (diffusers trained or fine-tuned both) load into a model with ``separate_cross_query``."""

from ..models.nextdit import PRESETS, NextDiT, NextDiTConfig
from .dit import DiTWeights, Layout, fairscale_rows
from .rules import RuleTable, ShardTable

_NAMES = (  # original name, diffusers name ({i}: layer)
    ("pad_token", "pad_token"),
    ("x_embedder.{p}", "patch_embedder.proj.{p}"),
    ("t_embedder.mlp.0.{p}", "time_caption_embed.timestep_embedder.linear_1.{p}"),
    ("t_embedder.mlp.2.{p}", "time_caption_embed.timestep_embedder.linear_2.{p}"),
    ("cap_embedder.0.{p}", "time_caption_embed.caption_embedder.0.{p}"),
    ("cap_embedder.1.{p}", "time_caption_embed.caption_embedder.1.{p}"),
    ("layers.{i}.attention.gate", "layers.{i}.gate"),
    ("layers.{i}.adaLN_modulation.1.{p}", "layers.{i}.norm1.linear.{p}"),
    ("layers.{i}.attention_norm1.weight", "layers.{i}.norm1.norm.weight"),
    ("layers.{i}.attention_norm2.weight", "layers.{i}.norm2.weight"),
    ("layers.{i}.ffn_norm1.weight", "layers.{i}.ffn_norm1.weight"),
    ("layers.{i}.ffn_norm2.weight", "layers.{i}.ffn_norm2.weight"),
    ("layers.{i}.attention_y_norm.weight", "layers.{i}.norm1_context.weight"),
    ("layers.{i}.attention.wk.weight", "layers.{i}.attn1.to_k.weight"),
    ("layers.{i}.attention.wv.weight", "layers.{i}.attn1.to_v.weight"),
    ("layers.{i}.attention.wk_y.weight", "layers.{i}.attn2.to_k.weight"),
    ("layers.{i}.attention.wv_y.weight", "layers.{i}.attn2.to_v.weight"),
    ("layers.{i}.attention.wo.weight", "layers.{i}.attn2.to_out.0.weight"),
    ("layers.{i}.attention.k_norm.{p}", "layers.{i}.attn1.norm_k.{p}"),
    ("layers.{i}.attention.ky_norm.{p}", "layers.{i}.attn2.norm_k.{p}"),
    ("layers.{i}.feed_forward.w1.weight", "layers.{i}.feed_forward.linear_1.weight"),
    ("layers.{i}.feed_forward.w2.weight", "layers.{i}.feed_forward.linear_2.weight"),
    ("layers.{i}.feed_forward.w3.weight", "layers.{i}.feed_forward.linear_3.weight"),
    ("final_layer.adaLN_modulation.1.{p}", "norm_out.linear_1.{p}"),
    ("final_layer.linear.{p}", "norm_out.linear_2.{p}"),
)


def _rows(query: dict) -> tuple:
    """Rule rows for each name pair (``{p}`` expanded to weight and bias) plus the query rows ``query``."""
    rows = []
    for ours, theirs in (*_NAMES, *query.items()):
        for p in ("weight", "bias") if "{p}" in ours else ("",):
            sources = theirs if isinstance(theirs, tuple) else (theirs,)
            rows.append((ours.replace("{p}", p), tuple(s.replace("{p}", p) for s in sources)))
    return tuple(rows)


DIFFUSERS_RULES = RuleTable("nextdit-diffusers", _rows({
    "layers.{i}.attention.wq.weight": ("layers.{i}.attn1.to_q.weight", "layers.{i}.attn2.to_q.weight"),
    "layers.{i}.attention.q_norm.{p}": ("layers.{i}.attn1.norm_q.{p}", "layers.{i}.attn2.norm_q.{p}"),
}))  # fmt: skip
DIFFUSERS_UNTIED_RULES = RuleTable("nextdit-diffusers-untied", _rows({
    "layers.{i}.attention.wq.weight": "layers.{i}.attn1.to_q.weight",
    "layers.{i}.attention.q_norm.{p}": "layers.{i}.attn1.norm_q.{p}",
    "layers.{i}.attention.wq_y.weight": "layers.{i}.attn2.to_q.weight",
    "layers.{i}.attention.qy_norm.{p}": "layers.{i}.attn2.norm_q.{p}",
}))  # fmt: skip

NEXTDIT = DiTWeights(
    name="Next-DiT",
    config=NextDiTConfig,
    model=NextDiT,
    presets=PRESETS,
    # original model_args.pth "model" names (Lumina-Next-T2I / -SFT use the GQA model with --qk_norm)
    model_names={"NextDiT_2B_GQA_patch2": "nextdit-2b-gqa", "NextDiT_2B_patch2": "nextdit-2b"},
    shards=ShardTable(
        "nextdit-fairscale",
        fairscale_rows(("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"), ("pad_token",)),
    ),
    layouts=(
        Layout("original", None, "x_embedder.weight"),
        Layout(
            "diffusers", DIFFUSERS_RULES, "patch_embedder.proj.weight", DIFFUSERS_UNTIED_RULES, "separate_cross_query"
        ),
    ),  # fmt: skip
)
