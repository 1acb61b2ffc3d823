"""The decoder-only prompt encoder of both Lumina generations: Gemma-1 (Lumina-Next) and LLaMA-2 (Lumina-T2I).

Ported from transformers 4.57.1 ``models/gemma/modeling_gemma.py`` and ``models/llama/modeling_llama.py``
(``GemmaModel``, ``LlamaModel``, Apache-2.0). One stack: token lookup, rotate-half RoPE, causal + padding attention
with grouped kv heads, a gated MLP, RMSNorms. The families differ only in what their config class fixes:

=================  =============================================  ===========================================
                   Gemma (``gemma.GemmaConfig``)                  LLaMA (``llama.LlamaConfig``)
=================  =============================================  ===========================================
RMSNorm            ``x * (1 + w)`` in fp32, cast at the end       ``normalise(x).to(dtype) * w``
embeddings         times ``sqrt(hidden)`` rounded to the dtype    as looked up
MLP activation     tanh-approximate GELU                          SiLU
output             ``hidden_states[-2]``: layers 0..n-2, no norm  ``last_hidden_state``: all layers + norm
=================  =============================================  ===========================================

Parameter names are those of ``GemmaModel`` / ``LlamaModel``. No KV cache, no LM head. Weights that are not run
(Gemma's last layer and final norm) are still parameters, so Hugging Face checkpoints load strictly.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops

from .. import backend
from ..models.layers import RMSNorm, linear


@dataclass(frozen=True)
class DecoderConfig:
    """The fields of a Hugging Face Gemma / LLaMA config that change the encoder's output (same names). A field left
    None takes the family's default (``DEFAULTS``; head_dim and num_key_value_heads None there are derived as
    transformers derives them)."""

    MODEL_TYPE: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict] = {}
    NORM_OFFSET: ClassVar[bool] = False
    SCALE_EMBEDDINGS: ClassVar[bool] = False
    ACTIVATION: ClassVar[str] = "silu"
    PENULTIMATE: ClassVar[bool] = False  # output hidden_states[-2] instead of last_hidden_state

    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float | None = None
    rope_theta: float | None = None
    max_position_embeddings: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None:
                object.__setattr__(self, f.name, self.DEFAULTS.get(f.name))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be positive, got {getattr(self, f.name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"rotate-half RoPE needs an even head_dim, got {self.head_dim}")

    @classmethod
    def from_hf_config(cls, hf: dict):
        """From a Hugging Face ``config.json`` dict; settings this port does not implement are refused by name,
        fields that do not change the output are ignored."""
        if hf.get("model_type", cls.MODEL_TYPE) != cls.MODEL_TYPE:
            raise ValueError(f"expected a {cls.MODEL_TYPE} config (model_type {cls.MODEL_TYPE!r}), got model_type "
                             f"{hf.get('model_type')!r}")  # fmt: skip
        if hf.get("rope_scaling") is not None:
            raise ValueError(f"rope_scaling {hf['rope_scaling']!r} is not supported")
        cls.check_hf(hf)
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in fields})

    @classmethod
    def check_hf(cls, hf: dict) -> None:
        """Family-specific refusals (subclasses)."""


class TokenEmbedding(nn.Cell):
    """Token lookup through ``ops.gather`` (``mint.nn.functional.embedding`` has no CPU kernel in PyNative)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = Parameter(Tensor(np.zeros((vocab_size, dim), np.float32)))  # values come from a checkpoint

    def construct(self, input_ids):
        return ops.gather(self.weight, input_ids, 0)  # (B, L, hidden)


class DecoderAttention(nn.Cell):
    """Causal self-attention with rotate-half RoPE and grouped kv heads (multi-query in Gemma-2B)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5
        self.fused, self.compiled_kernel = backend.use_fused_kernels(), backend.compiled_kernels()

    def construct(self, x, cos, sin, key_mask, causal):
        b, seq, _ = x.shape
        q = _rotate(self.q_proj(x).reshape(b, seq, self.n_heads, self.head_dim), cos, sin)  # (B, L, N, D)
        k = _rotate(self.k_proj(x).reshape(b, seq, self.n_kv_heads, self.head_dim), cos, sin)  # (B, L, Nkv, D)
        v = self.v_proj(x).reshape(b, seq, self.n_kv_heads, self.head_dim)
        out = backend.attention(q, k, v, key_mask, self.scale, self.fused, causal, self.compiled_kernel)  # (B, L, N, D)
        return self.o_proj(out.reshape(b, seq, -1))  # (B, L, hidden)


def _rotate(x, cos, sin):
    """HF ``apply_rotary_pos_emb``: ``x cos + rotate_half(x) sin`` with (L, D) tables, in the dtype of ``x``."""
    half = x.shape[-1] // 2
    rotated = mint.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1).unsqueeze(0) + rotated * sin.unsqueeze(1).unsqueeze(0)  # (1, L, 1, D) tables


class GatedMLP(nn.Cell):
    """``down(act(gate(x)) * up(x))``: GeGLU (tanh GELU) for Gemma, SwiGLU for LLaMA."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gelu = cfg.ACTIVATION == "gelu_tanh"
        self.fused = backend.use_fused_kernels()

    def construct(self, x):
        g = self.gate_proj(x)
        g = backend.gelu_tanh(g, self.fused) if self.gelu else mint.nn.functional.silu(g)
        return self.down_proj(g * self.up_proj(x))


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.self_attn = DecoderAttention(cfg)
        self.mlp = GatedMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.NORM_OFFSET)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.NORM_OFFSET)

    def construct(self, x, cos, sin, key_mask, causal):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask, causal)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, L, hidden)


class DecoderEncoder(nn.Cell):
    """The decoder stack returning what Lumina feeds its DiT (module docstring table).

    transformers 4.57.1 records ``hidden_states`` as (input of layer 0, outputs of layers 0 .. n-2, final norm of the
    output of layer n-1), so Gemma's ``[-2]`` is the raw output of layer n-2: layers 0 .. n-2 are run, nothing after.

    ``construct(input_ids, attention_mask)``: (B, L) integer ids and (B, L) mask (1 = token, right padding) ->
    (B, L, hidden) in the parameter dtype. Rows at padded positions are computed but meaningless.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = TokenEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.CellList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.NORM_OFFSET)
        self.penultimate = cfg.PENULTIMATE
        self.n_run = cfg.num_hidden_layers - (1 if cfg.PENULTIMATE else 0)
        self.normalizer = math.sqrt(cfg.hidden_size) if cfg.SCALE_EMBEDDINGS else None
        # RoPE angles as transformers makes them: fp32 inverse frequencies times fp32 positions, one rounding each
        exponent = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
        self.inv_freq = Tensor(1.0 / np.float32(cfg.rope_theta) ** exponent, ms.float32)  # (D/2,)
        self.positions = Tensor(np.arange(cfg.max_position_embeddings, dtype=np.float32))  # also the causal order

    def construct(self, input_ids, attention_mask):
        seq = input_ids.shape[1]
        h = self.embed_tokens(input_ids)  # (B, L, hidden)
        if self.normalizer is not None:
            h = h * Tensor(self.normalizer, h.dtype)  # rounded to the model dtype first, as the reference does
        pos = self.positions[:seq]  # (L,)
        angles = pos.unsqueeze(1) * self.inv_freq.unsqueeze(0)  # (L, D/2)
        angles = mint.cat((angles, angles), dim=-1)  # (L, D)
        cos, sin = mint.cos(angles).astype(h.dtype), mint.sin(angles).astype(h.dtype)
        causal = (pos.unsqueeze(0) <= pos.unsqueeze(1)).unsqueeze(0).unsqueeze(0)  # (1, 1, L, L), True = not future
        key_mask = attention_mask.astype(ms.bool_)  # (B, L)
        for i in range(self.n_run):
            h = self.layers[i](h, cos, sin, key_mask, causal)
        return h if self.penultimate else self.norm(h)  # (B, L, hidden)
