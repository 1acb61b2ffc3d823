"""Flag-DiT, the 5B diffusion transformer of Lumina-T2I (the first Lumina-T2X model), in MindSpore.

Ported from Lumina-T2X ``lumina_t2i/models/model.py`` (``DiT_Llama``, commit 1c60696; itself derived from Meta's DiT,
CC-BY-NC, and Lumina-T2X, MIT), with fairscale's model-parallel layers replaced by the plain layers they reduce to at
world size 1. Parameter names are the original checkpoint names. What Flag-DiT shares with Next-DiT is imported from
``nextdit.py`` (timestep embedder, attention with the gated caption cross-attention, SwiGLU FFN); what differs
(spec section 1.2) is here:

* 1-D RoPE over the flattened token sequence, with a learnable ``eol_token`` ([nextline]) after every row of patches:
  L = (H/p)(W/p + 1). ``rope_scaling_factor`` divides the positions, ``ntk_factor`` multiplies theta.
* Six-way adaLN (shift, scale, gate for attention and FFN), gates not tanh'd, pre-norms only.
* The final layer shifts as well as scales.

Deviations, as in ``nextdit.py``: RoPE tables and the proportional-attention gain are ``construct`` inputs (the
original's ``forward_with_cfg`` rebuilds ``freqs_cis`` and rewrites attributes of every layer); only the batched tensor
path is implemented (``pad_token`` is kept so checkpoints load strictly); the learned-sigma half is dropped inside
``construct``. Time convention: t in [0, 1], t = 0 is noise and t = 1 is data.
"""

from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn

from . import nextdit, rope
from .layers import LayerNorm, RMSNorm, linear
from .nextdit import Attention, CheckedInputs, DiTShape, FeedForward, TimestepEmbedder

ROPE_LENGTH = 40000  # the original precomputes 40000 positions (``precompute_freqs_cis(head_dim, 40000)``)


# ------------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlagDiTConfig(DiTShape):
    """Keyword arguments of the original ``DiT_Llama`` constructor (same names and defaults).

    ``rope_scaling_factor`` and ``ntk_factor`` change no parameter: they are the RoPE scaling ``forward`` uses when
    the caller gives none, as the original's constructor sets its ``freqs_cis``.
    """

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
    rope_scaling_factor: float = 1.0
    ntk_factor: float = 1.0

    FAMILY = "Flag-DiT"

    def __post_init__(self):
        self._check_sizes("1-D", rope_divisor=2)  # 1-D RoPE rotates pairs
        for name in ("rope_scaling_factor", "ntk_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def num_parameters(self) -> int:
        d, c, kv, f, y = self.dim, self.cond_dim, self.kv_heads * self.head_dim, self.ffn_hidden, self.cap_feat_dim
        p2 = self.patch_size**2
        attn = 2 * d * d + 2 * d * kv + 2 * y * kv + self.n_heads + (2 * d + 4 * kv if self.qk_norm else 0)
        block = attn + 3 * d * f + 2 * d + y + (c + 1) * 6 * d  # + attention_norm, ffn_norm, y norm, 6-way adaLN
        top = (p2 * self.in_channels + 1) * d + (256 + 1) * c + (c + 1) * c + 2 * y + (y + 1) * c + 2 * d  # eol, pad
        final = (d + 1) * p2 * self.out_channels + (c + 1) * 2 * d
        return top + self.n_layers * block + final


PRESETS = {
    # Lumina-T2I: DiT_Llama_5B_patch2 with --qk_norm, conditioned on LLaMA-2-7B (hidden 4096).
    "flagdit-5b": FlagDiTConfig(dim=3072, n_layers=32, n_heads=32, qk_norm=True, cap_feat_dim=4096),
}


def resolve_config(arch) -> FlagDiTConfig:
    """A preset name, a path to a JSON of constructor arguments, a dict, or a config."""
    return nextdit.resolve_dit_config(arch, FlagDiTConfig, PRESETS)


# ------------------------------------------------------------------------------------------------------------------
# 1-D RoPE
# ------------------------------------------------------------------------------------------------------------------
def rope_table(head_dim: int, seq_len: int, rope_scaling_factor: float = 1.0, ntk_factor: float = 1.0):
    """cos/sin (L, head_dim/2) float32 of the original ``precompute_freqs_cis(head_dim, 40000, ...)[:L]``:
    ``omega_k = (theta * ntk)^(-2k / D)`` at positions ``l / rope_scaling_factor``.

    Built in float64 like ``rope.py``. The original rounds frequencies and angles to float32 (its pow is not even
    correctly rounded), so its own angles are off by up to ~2e-7 of their size: 1e-4 rad at 4k tokens.
    """
    if seq_len > ROPE_LENGTH:
        raise ValueError(f"{seq_len} tokens exceed the {ROPE_LENGTH}-position RoPE table of Flag-DiT")
    if not (rope_scaling_factor > 0 and ntk_factor > 0):
        raise ValueError(f"RoPE factors must be positive, got {rope_scaling_factor} and ntk {ntk_factor}")
    exponent = np.arange(0, head_dim, 2, dtype=np.float64)[: head_dim // 2] / head_dim
    freqs = 1.0 / (rope.THETA * ntk_factor) ** exponent  # (D/2,)
    angles = np.outer(np.arange(seq_len, dtype=np.float64) / rope_scaling_factor, freqs)  # (L, D/2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def token_count(cfg: FlagDiTConfig, height: int, width: int) -> int:
    """Tokens of a ``height x width`` latent: rows of W/p patches, each followed by an ``eol_token``."""
    return (height // cfg.patch_size) * (width // cfg.patch_size + 1)


# ------------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------------
class TransformerBlock(nn.Cell):
    """Six-way adaLN (shift, scale, untanh'd gate) around pre-normed attention and FFN."""

    def __init__(self, cfg: FlagDiTConfig):
        super().__init__()
        d, eps = cfg.dim, cfg.norm_eps
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(d, cfg.ffn_hidden)
        self.attention_norm = RMSNorm(d, eps)
        self.ffn_norm = RMSNorm(d, eps)
        self.adaLN_modulation = nn.SequentialCell([nn.SiLU(), _zero_linear(cfg.cond_dim, 6 * d)])
        self.attention_y_norm = RMSNorm(cfg.cap_feat_dim, eps)

    def construct(self, x, cos, sin, gain, y, y_mask, c):
        mod = mint.chunk(self.adaLN_modulation(c).unsqueeze(1), 6, dim=2)  # (B, 1, dim) x6
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        h = self.attention_norm(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attention(h, cos, sin, gain, self.attention_y_norm(y), y_mask)
        h = self.ffn_norm(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.feed_forward(h)  # (B, L, dim)


class FinalLayer(nn.Cell):
    """LayerNorm (no affine, eps 1e-6), ``* (1 + scale) + shift`` from adaLN(c), then a linear to patch pixels."""

    def __init__(self, cfg: FlagDiTConfig):
        super().__init__()
        self.norm_final = LayerNorm(cfg.dim, eps=1e-6, affine=False)
        self.linear = _zero_linear(cfg.dim, cfg.patch_size**2 * cfg.out_channels)
        self.adaLN_modulation = nn.SequentialCell([nn.SiLU(), _zero_linear(cfg.cond_dim, 2 * cfg.dim)])

    def construct(self, x, c):
        shift, scale = mint.chunk(self.adaLN_modulation(c).unsqueeze(1), 2, dim=2)  # (B, 1, dim) x2
        return self.linear(self.norm_final(x) * (1 + scale) + shift)  # (B, L, p*p*C_out)


# ------------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------------
class FlagDiT(CheckedInputs, nn.Cell):
    """Flag-DiT velocity model ``v(x_t, t, caption)``, with the construct contract of ``nextdit.NextDiT``.

    ``construct(x, t, cap_feats, cap_mask, rope_cos, rope_sin, attn_gain)``:
        x (B, C, H, W) latents; t (B,) in [0, 1]; cap_feats (B, Lc, cap_feat_dim); cap_mask (B, Lc), 1 = token;
        rope_cos / rope_sin (L, head_dim/2) float32 with L = (H/p)(W/p + 1) (``rope_table``); attn_gain (1,)
        float32, the proportional-attention factor (``rope.proportional_attention_gain``).
        Returns the velocity (B, C, H, W). ``forward`` below builds the tables from scaling settings.
    """

    def __init__(self, cfg: FlagDiTConfig):
        super().__init__()
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.dim
        self.x_embedder = linear(p * p * cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(cfg.cond_dim)
        self.cap_embedder = nn.SequentialCell(
            [LayerNorm(cfg.cap_feat_dim), _zero_linear(cfg.cap_feat_dim, cfg.cond_dim)]
        )
        self.layers = nn.CellList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_layer = FinalLayer(cfg)
        normal = ms.common.initializer.Normal(sigma=0.02)
        self.eol_token = Parameter(ms.common.initializer.initializer(normal, (d,), ms.float32))  # [nextline]
        self.pad_token = Parameter(ms.common.initializer.initializer(normal, (d,), ms.float32))  # list path only

    def token_count(self, height: int, width: int) -> int:
        return token_count(self.cfg, height, width)

    def construct(self, x, t, cap_feats, cap_mask, rope_cos, rope_sin, attn_gain):
        b, c, h, w = x.shape
        p, d = self.cfg.patch_size, self.cfg.dim
        gh, gw = h // p, w // p
        x = mint.permute(x.reshape(b, c, gh, p, gw, p), (0, 2, 4, 1, 3, 5)).reshape(b, gh, gw, c * p * p)  # (c,ph,pw)
        x = self.x_embedder(x)  # (B, gh, gw, dim)
        eol = mint.broadcast_to(self.eol_token.astype(x.dtype).reshape(1, 1, 1, d), (b, gh, 1, d))
        x = mint.cat([x, eol], dim=2).reshape(b, gh * (gw + 1), d)  # (B, L, dim), L = gh (gw + 1)

        mask = cap_mask.astype(ms.float32).unsqueeze(2)  # (B, Lc, 1)
        pooled = (cap_feats.astype(ms.float32) * mask).sum(axis=1) / mask.sum(axis=1)  # masked mean, (B, Dc)
        c_emb = self.t_embedder(t) + self.cap_embedder(pooled.astype(cap_feats.dtype))  # (B, cond)
        y_mask = cap_mask.astype(ms.bool_)
        for layer in self.layers:
            x = layer(x, rope_cos, rope_sin, attn_gain, cap_feats, y_mask, c_emb)

        x = self.final_layer(x, c_emb)  # (B, L, p*p*C_out), token vector read as (ph, pw, c)
        c_out = self.cfg.out_channels
        x = x.reshape(b, gh, gw + 1, p, p, c_out)[:, :, :gw]  # drop the eol column
        x = mint.permute(x, (0, 5, 1, 3, 2, 4)).reshape(b, c_out, h, w)
        if self.cfg.learn_sigma:
            x = x[:, : self.cfg.in_channels]
        return x  # (B, C, H, W)


def _zero_linear(in_dim: int, out_dim: int) -> nn.Dense:
    return nn.Dense(in_dim, out_dim, weight_init="zeros", bias_init="zeros")


# ------------------------------------------------------------------------------------------------------------------
# Calling conventions of the original: plain forward and forward_with_cfg
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RopeScaling:
    """Resolution extrapolation settings of Flag-DiT (``forward_with_cfg``'s keyword arguments).

    Positions are divided by ``rope_scaling_factor`` and theta multiplied by ``ntk_factor`` (the demo sets the area
    ratio ``(W/16)(H/16) / (1024/16)^2``); ``base_seqlen`` turns proportional attention on (demo:
    ``(1024/16)^2 + (1024/16) * 2``). None: the model config's own factors, no proportional attention.
    """

    rope_scaling_factor: float | None = None
    ntk_factor: float | None = None
    base_seqlen: int | None = None


def rope_inputs(cfg: FlagDiTConfig, height: int, width: int, scaling: RopeScaling = RopeScaling()):
    """(rope_cos, rope_sin, attn_gain) Tensors for a latent of ``height x width``."""
    seq = token_count(cfg, height, width)
    factor = cfg.rope_scaling_factor if scaling.rope_scaling_factor is None else scaling.rope_scaling_factor
    ntk = cfg.ntk_factor if scaling.ntk_factor is None else scaling.ntk_factor
    cos, sin = rope_table(cfg.head_dim, seq, factor, ntk)
    gain = rope.proportional_attention_gain(seq, scaling.base_seqlen)
    return Tensor(cos), Tensor(sin), Tensor(np.array([gain], np.float32))


def forward(model: FlagDiT, x, t, cap_feats, cap_mask, scaling: RopeScaling = RopeScaling()):
    """The original ``DiT_Llama.forward`` (default scaling) or its scaled variant."""
    cos, sin, gain = rope_inputs(model.cfg, x.shape[2], x.shape[3], scaling)
    return model(x, t, cap_feats, cap_mask, cos, sin, gain)


def forward_with_cfg(model, x, t, cap_feats, cap_mask, cfg_scale: float, scaling=RopeScaling(), guided_channels=3):
    """The original ``forward_with_cfg`` (batch [cond, uncond], guidance on the first ``guided_channels``), as
    ``nextdit.forward_with_cfg`` with Flag-DiT's RoPE scaling."""
    return nextdit.forward_with_cfg(model, x, t, cap_feats, cap_mask, cfg_scale, scaling, guided_channels, forward)


def attention_base_seqlen(train_size: int = 1024, size_multiple: int = 16) -> int:
    """The demo's proportional-attention base: ``(1024/16)^2 + (1024/16) * 2`` = 4224 tokens."""
    side = train_size // size_multiple
    return side * side + side * 2


def ntk_factor_for(height_px: int, width_px: int, train_size: int = 1024, size_multiple: int = 16) -> float:
    """The demo's ``ntk_factor`` for an image size: patch-grid area over the training area (1 at 1024^2)."""
    return (width_px // size_multiple) * (height_px // size_multiple) / (train_size // size_multiple) ** 2
