"""What Next-DiT and Flag-DiT share: the config fields of their original constructors, the timestep embedder,
attention with grouped kv heads, qk-norm, RoPE and gated caption cross-attention, the SwiGLU feed-forward, the final
layer, patchify / unpatchify, the caption conditioning and the input checks run before a graph compiles.

Ported from Lumina-T2X (commit 1c60696) ``lumina_next_t2i_mini/models/nextdit.py`` and ``lumina_t2i/models/model.py``
(both derived from Meta's DiT, CC-BY-NC, and Lumina-T2X, MIT). Parameter names are the original checkpoint names.
"""

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn

from .. import backend
from . import context_drop
from .layers import LayerNorm, linear, normal_parameter, zero_linear


# ------------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiTShape:
    """Keyword arguments both original constructors take (same names and defaults). Subclasses set ``FAMILY``,
    ``IGNORED_ARGS`` (run-time settings of the original, accepted and ignored by ``from_dict``) and the RoPE layout
    (``ROPE``: name, ``ROPE_DIVISOR``: what head_dim must divide by)."""

    FAMILY = "DiT"
    IGNORED_ARGS = ()
    ROPE, ROPE_DIVISOR = "", 1

    patch_size: int = 2
    in_channels: int = 4
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    learn_sigma: bool = True
    qk_norm: bool = False
    cap_feat_dim: int = 5120

    def __post_init__(self):
        for name in ("patch_size", "in_channels", "dim", "n_layers", "n_heads", "multiple_of", "cap_feat_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if self.head_dim % self.ROPE_DIVISOR:
            raise ValueError(f"{self.ROPE} RoPE needs head_dim divisible by {self.ROPE_DIVISOR}, got {self.head_dim}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def cond_dim(self) -> int:
        return min(self.dim, 1024)  # width of the timestep / caption embedding and of the adaLN input

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def ffn_hidden(self) -> int:
        """LLaMA FFN width: 2/3 of 4 * dim, times the multiplier, rounded up to ``multiple_of``."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def shared_parameters(self) -> tuple:
        """(per-block attention + FFN parameters, parameters outside the blocks but the final linear): the parameter
        count both families share; each adds its norms and modulation."""
        d, c, kv, y = self.dim, self.cond_dim, self.kv_heads * self.head_dim, self.cap_feat_dim
        attn = 2 * d * d + 2 * d * kv + 2 * y * kv + self.n_heads + (2 * d + 4 * kv if self.qk_norm else 0)
        top = d + (self.patch_size**2 * self.in_channels + 1) * d + (256 + 1) * c + (c + 1) * c + 2 * y + (y + 1) * c
        return attn + 3 * d * self.ffn_hidden + y, top + (d + 1) * self.patch_size**2 * self.out_channels

    @classmethod
    def from_dict(cls, args: dict):
        """Build from the original constructor's keyword arguments (``model_args.json``)."""
        args = {k: v for k, v in args.items() if k not in cls.IGNORED_ARGS}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown {cls.FAMILY} argument(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**args)

    @classmethod
    def resolve(cls, arch, presets: dict):
        """A preset name, a path to a JSON of constructor arguments, a dict, or a config."""
        if isinstance(arch, cls):
            return arch
        if isinstance(arch, dict):
            return cls.from_dict(arch)
        if arch in presets:
            return presets[arch]
        if str(arch).endswith(".json"):
            try:
                with open(arch) as f:
                    return cls.from_dict(json.load(f))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read {cls.FAMILY} arguments from {arch}: {e}") from e
        raise ValueError(f"unknown architecture {arch!r}: expected a preset {sorted(presets)} or a .json file")


# ------------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------------
class TimestepEmbedder(nn.Cell):
    """Sinusoidal embedding of t in [0, 1] (cos first, max period 1e4, no x1000) followed by an MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        init = ms.common.initializer.Normal(sigma=0.02)
        self.mlp = nn.SequentialCell(
            [nn.Dense(freq_dim, hidden, weight_init=init), nn.SiLU(), nn.Dense(hidden, hidden, weight_init=init)]
        )
        half = freq_dim // 2
        self.freqs = Tensor(np.exp(-math.log(10000) * np.arange(half, dtype=np.float32) / half), ms.float32)

    def construct(self, t):
        args = t.astype(ms.float32).unsqueeze(1) * self.freqs.unsqueeze(0)  # (B, 128)
        emb = mint.cat([mint.cos(args), mint.sin(args)], dim=-1)  # (B, 256)
        return self.mlp(emb.astype(self.mlp[0].weight.dtype))  # (B, C)


class Attention(nn.Cell):
    """Self-attention with RoPE plus gated cross-attention to the caption, both from the rotated queries; the
    self-attention optionally with Context Drop's merged keys and values (``context_drop.py``).

    ``separate_cross_query``: the cross-attention has its own query projection ``wq_y`` (and ``qy_norm``). The
    original shares ``wq``; diffusers stores the query twice (``attn1.to_q``, ``attn2.to_q``) and trains both, so a
    model trained or fine-tuned in diffusers needs two.
    """

    def __init__(self, cfg: DiTShape, separate_cross_query: bool = False):
        super().__init__()
        d, kv = cfg.dim, cfg.kv_heads * cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = linear(d, d, bias=False)
        self.wk = linear(d, kv, bias=False)
        self.wv = linear(d, kv, bias=False)
        self.wk_y = linear(cfg.cap_feat_dim, kv, bias=False)
        self.wv_y = linear(cfg.cap_feat_dim, kv, bias=False)
        self.gate = Parameter(Tensor(np.zeros(cfg.n_heads, np.float32)))  # per-head tanh gate; zero = cross-attn shut
        self.wo = linear(d, d, bias=False)
        self.separate = separate_cross_query
        if self.separate:
            self.wq_y = linear(d, d, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # LayerNorm across all heads jointly, before the split into heads
            self.q_norm = LayerNorm(d)
            self.k_norm = LayerNorm(kv)
            self.ky_norm = LayerNorm(kv)
            if self.separate:
                self.qy_norm = LayerNorm(d)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.fused, self.compiled_kernel = backend.use_fused_kernels(), backend.compiled_kernels()

    def construct(self, x, cos, sin, gain, y, y_mask, merge_index=None, merge_weight=None):
        """``merge_index``/``merge_weight``: Context Drop's pooling tables (``context_drop.merge_tables``); None
        (a graph constant) is full self-attention."""
        b, seq, _ = x.shape
        xq, xk = self.wq(x), self.wk(x)  # (B, L, N*D), (B, L, Nkv*D)
        yk = self.wk_y(y)  # (B, Lc, Nkv*D)
        if self.qk_norm:
            xq, xk, yk = self.q_norm(xq), self.k_norm(xk), self.ky_norm(yk)
        xq = xq.reshape(b, seq, self.n_heads, self.head_dim)  # (B, L, N, D)
        xk = xk.reshape(b, seq, self.n_kv_heads, self.head_dim)  # (B, L, Nkv, D)
        xq, xk = backend.apply_rope(xq, cos, sin, self.fused), backend.apply_rope(xk, cos, sin, self.fused)
        if merge_index is None:
            xv = self.wv(x).reshape(b, seq, self.n_kv_heads, self.head_dim)  # (B, L, Nkv, D)
        else:  # Context Drop: the finished keys pooled; the values pooled before wv, which is linear
            xk = context_drop.pool_tokens(xk, merge_index, merge_weight)  # (B, S, Nkv, D)
            xv = self.wv(context_drop.pool_tokens(x, merge_index, merge_weight))  # (B, S, Nkv*D)
            xv = xv.reshape(b, -1, self.n_kv_heads, self.head_dim)  # (B, S, Nkv, D)
        # proportional attention multiplies the self-attention softmax scale only; the cross branch keeps 1/sqrt(D)
        fused, compiled = self.fused, self.compiled_kernel
        out = backend.attention(xq * gain.astype(xq.dtype), xk, xv, None, self.scale, fused, compiled=compiled)
        if self.separate:  # the cross-attention's own query, normed and rotated as the shared one
            xq = self.wq_y(x)
            xq = self.qy_norm(xq) if self.qk_norm else xq
            xq = backend.apply_rope(xq.reshape(b, seq, self.n_heads, self.head_dim), cos, sin, self.fused)
        yk = yk.reshape(b, -1, self.n_kv_heads, self.head_dim)  # (B, Lc, Nkv, D)
        yv = self.wv_y(y).reshape(b, -1, self.n_kv_heads, self.head_dim)
        out_y = backend.attention(xq, yk, yv, y_mask, self.scale, fused, compiled=compiled)  # (B, L, N, D)
        out = out + out_y * mint.tanh(self.gate).reshape(1, 1, -1, 1)
        return self.wo(out.reshape(b, seq, -1))  # (B, L, dim)


class FeedForward(nn.Cell):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = linear(dim, hidden, bias=False)
        self.w2 = linear(hidden, dim, bias=False)
        self.w3 = linear(dim, hidden, bias=False)

    def construct(self, x):
        return self.w2(mint.nn.functional.silu(self.w1(x)) * self.w3(x))


class FinalLayer(nn.Cell):
    """LayerNorm (no affine, eps 1e-6) modulated by adaLN(c): ``* (1 + scale)`` (Next-DiT) or ``* (1 + scale) +
    shift`` (Flag-DiT, ``shift``), then a linear to patch pixels."""

    def __init__(self, cfg: DiTShape, shift: bool):
        super().__init__()
        self.shift = shift
        self.norm_final = LayerNorm(cfg.dim, eps=1e-6, affine=False)
        self.linear = zero_linear(cfg.dim, cfg.patch_size**2 * cfg.out_channels)
        self.adaLN_modulation = nn.SequentialCell([nn.SiLU(), zero_linear(cfg.cond_dim, (2 if shift else 1) * cfg.dim)])

    def construct(self, x, c):
        mod = self.adaLN_modulation(c)  # (B, dim or 2 dim)
        if self.shift:
            shift, scale = mint.chunk(mod, 2, dim=1)
            return self.linear(self.norm_final(x, 1 + scale, shift))  # (B, L, p*p*C_out)
        return self.linear(self.norm_final(x, 1 + mod))


def build(model: nn.Cell, cfg: DiTShape, block, final_shift: bool, tokens: tuple = ("pad_token",)) -> None:
    """Give ``model`` the parts of a Lumina DiT under their original names and in their original order (parameter
    order sets the initial random draws): the embedders, ``n_layers`` blocks of class ``block``, the final layer,
    then the learned (dim,) ``tokens``: Flag-DiT's ``eol_token``, and both families' ``pad_token``, which serves only
    the original's list path of differently sized images (kept so that checkpoints load strictly)."""
    p = cfg.patch_size
    model.x_embedder = linear(p * p * cfg.in_channels, cfg.dim)
    model.t_embedder = TimestepEmbedder(cfg.cond_dim)
    model.cap_embedder = nn.SequentialCell([LayerNorm(cfg.cap_feat_dim), zero_linear(cfg.cap_feat_dim, cfg.cond_dim)])
    model.layers = nn.CellList([block(cfg) for _ in range(cfg.n_layers)])
    model.final_layer = FinalLayer(cfg, shift=final_shift)
    for name in tokens:
        setattr(model, name, normal_parameter((cfg.dim,)))


def patchify(x, p: int):
    """(B, C, H, W) -> (B, H/p, W/p, C*p*p): each token's vector ordered (c, ph, pw) as the original."""
    b, c, h, w = x.shape
    return mint.permute(x.reshape(b, c, h // p, p, w // p, p), (0, 2, 4, 1, 3, 5)).reshape(b, h // p, w // p, c * p * p)


def unpatchify(x, p: int, c_out: int, keep: int):
    """(B, H/p, W/p, p*p*C_out) with each token read as (ph, pw, c) -> (B, keep, H, W): the first ``keep`` channels
    (the velocity; the learned-sigma half is dropped)."""
    b, gh, gw, _ = x.shape
    x = mint.permute(x.reshape(b, gh, gw, p, p, c_out), (0, 5, 1, 3, 2, 4)).reshape(b, c_out, gh * p, gw * p)
    return x if keep == c_out else x[:, :keep]


def conditioning(model, t, cap_feats, cap_mask):
    """(c (B, cond): timestep embedding + embedding of the masked mean caption, y_mask (B, Lc) bool)."""
    mask = cap_mask.astype(ms.float32).unsqueeze(2)  # (B, Lc, 1)
    pooled = (cap_feats.astype(ms.float32) * mask).sum(axis=1) / mask.sum(axis=1)  # (B, Dc)
    return model.t_embedder(t) + model.cap_embedder(pooled.astype(cap_feats.dtype)), cap_mask.astype(ms.bool_)


# ------------------------------------------------------------------------------------------------------------------
# Input checks before the graph runs
# ------------------------------------------------------------------------------------------------------------------
class CheckedInputs:
    """``check_inputs`` before compilation, for the DiT ``construct`` contract ``(x, t, cap_feats, cap_mask,
    rope_cos, rope_sin, attn_gain)``; the model gives ``cfg`` and ``token_count(height, width)``."""

    def check_inputs(self, x, t, cap_feats, cap_mask, rope_cos=None, rope_sin=None):
        """Raise ``ValueError`` naming the first input that does not fit this model."""
        cfg, p = self.cfg, self.cfg.patch_size
        if len(x.shape) != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W) latents, got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        if h % p or w % p:
            raise ValueError(f"latent height and width must be divisible by the patch size {p}, got {h}x{w}")
        if tuple(t.shape) != (b,):
            raise ValueError(f"t must have shape ({b},), got {tuple(t.shape)}")
        if len(cap_feats.shape) != 3 or cap_feats.shape[0] != b or cap_feats.shape[2] != cfg.cap_feat_dim:
            raise ValueError(f"cap_feats must be ({b}, Lc, {cfg.cap_feat_dim}), got shape {tuple(cap_feats.shape)}")
        if tuple(cap_mask.shape) != tuple(cap_feats.shape[:2]):
            raise ValueError(f"cap_mask must be {tuple(cap_feats.shape[:2])}, got shape {tuple(cap_mask.shape)}")
        seq = self.token_count(h, w)
        for name, table in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            if table is not None and tuple(table.shape) != (seq, cfg.head_dim // 2):
                raise ValueError(f"{name} must be ({seq}, {cfg.head_dim // 2}), got shape {tuple(table.shape)}")

    def __call__(self, *args, **kwargs):
        if len(args) >= 4 and not kwargs:  # validate before graph compilation, in both modes
            self.check_inputs(*args[:4], *args[4:6])
        return super().__call__(*args, **kwargs)
