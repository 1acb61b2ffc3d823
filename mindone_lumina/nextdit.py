"""Next-DiT, the flow-matching diffusion transformer of Lumina-Next, in MindSpore.

Ported from Lumina-T2X ``lumina_next_t2i_mini/models/nextdit.py`` (commit 1c60696; itself derived from Meta's DiT,
CC-BY-NC, and Lumina-T2X, MIT). Parameter names are the original checkpoint names, so an original
``consolidated.*.safetensors`` loads by identity. Deviations from the original, all deliberate:

* RoPE tables and the proportional-attention gain are inputs of ``construct`` (built on the host by ``rope.py``),
  never module state mutated per step as the original ``forward_with_cfg`` does.
* Only the batched tensor path (all images of a batch share one size, image mask all ones) is implemented; the
  original's list path (padding with ``pad_token``) is not. ``pad_token`` is kept so checkpoints load strictly.
* The model returns the velocity only (the learned-sigma half is dropped inside ``construct``, as the original).

Time convention: ``t`` in [0, 1], t = 0 is noise and t = 1 is data (see ``sampling.py``).
"""

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn

from . import backend, rope
from .convert import RuleTable
from .layers import LayerNorm, RMSNorm, cast_parameters, linear
from .sampling import combine_guidance


# ------------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------------
class DiTShape:
    """Derived sizes and checks shared by the Lumina DiT configs (Next-DiT here, Flag-DiT in ``flagdit.py``): both
    take the original constructors' argument names. Subclasses set ``FAMILY`` and ``IGNORED_ARGS``."""

    FAMILY = "DiT"
    IGNORED_ARGS = ()  # constructor arguments of the original that are run-time settings, accepted and ignored

    def _check_sizes(self, rope: str, rope_divisor: int):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if self.head_dim % rope_divisor:
            raise ValueError(f"{rope} RoPE needs head_dim divisible by {rope_divisor}, got {self.head_dim}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.kv_heads}")
        for name in ("patch_size", "in_channels", "n_layers", "multiple_of", "cap_feat_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

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

    @classmethod
    def from_dict(cls, args: dict):
        """Build from the original constructor's keyword arguments (``model_args.json``)."""
        args = {k: v for k, v in args.items() if k not in cls.IGNORED_ARGS}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown {cls.FAMILY} argument(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**args)


def resolve_dit_config(arch, cls, presets: dict):
    """A preset name, a path to a JSON of constructor arguments, a dict, or a ``cls`` instance."""
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


@dataclass(frozen=True)
class NextDiTConfig(DiTShape):
    """Keyword arguments of the original ``NextDiT`` constructor (same names and defaults). ``scale_factor`` and
    ``use_flash_attn`` are run-time settings of the original: ``from_dict`` accepts and ignores them."""

    FAMILY = "Next-DiT"
    IGNORED_ARGS = ("scale_factor", "use_flash_attn")

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
        self._check_sizes("2-D", rope_divisor=4)  # 2-D RoPE: half the head for rows, half for columns, in pairs

    def num_parameters(self) -> int:
        d, c, kv, f, y = self.dim, self.cond_dim, self.kv_heads * self.head_dim, self.ffn_hidden, self.cap_feat_dim
        p2 = self.patch_size**2
        attn = d * d * 2 + d * kv * 2 + y * kv * 2 + self.n_heads + (2 * d + 4 * kv if self.qk_norm else 0)
        block = attn + 3 * d * f + 4 * d + y + c * 4 * d + 4 * d
        top = d + (p2 * self.in_channels + 1) * d + (256 + 1) * c + (c + 1) * c + 2 * y + (y + 1) * c
        final = (d + 1) * p2 * self.out_channels + (c + 1) * d
        return top + self.n_layers * block + final


PRESETS = {
    # Lumina-Next-T2I and Lumina-Next-SFT (the released checkpoints): NextDiT_2B_GQA_patch2 with --qk_norm, Gemma-2B.
    "nextdit-2b-gqa": NextDiTConfig(dim=2304, n_layers=24, n_heads=32, n_kv_heads=8, qk_norm=True, cap_feat_dim=2048),
    # NextDiT_2B_patch2: the same without grouped kv heads.
    "nextdit-2b": NextDiTConfig(dim=2304, n_layers=24, n_heads=32, qk_norm=True, cap_feat_dim=2048),
}


def resolve_config(arch) -> NextDiTConfig:
    """A preset name, a path to a JSON of constructor arguments, a dict, or a config."""
    return resolve_dit_config(arch, NextDiTConfig, PRESETS)


# ------------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------------
class TimestepEmbedder(nn.Cell):
    """Sinusoidal embedding of t in [0, 1] (cos first, max period 1e4, no x1000) followed by an MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.mlp = nn.SequentialCell(
            [
                nn.Dense(freq_dim, hidden, weight_init=_normal(0.02), bias_init="zeros"),
                nn.SiLU(),
                nn.Dense(hidden, hidden, weight_init=_normal(0.02), bias_init="zeros"),
            ]
        )
        half = freq_dim // 2
        self.freqs = Tensor(np.exp(-math.log(10000) * np.arange(half, dtype=np.float32) / half), ms.float32)

    def construct(self, t):
        args = t.astype(ms.float32).unsqueeze(1) * self.freqs.unsqueeze(0)  # (B, 128)
        emb = mint.cat([mint.cos(args), mint.sin(args)], dim=-1)  # (B, 256)
        return self.mlp(emb.astype(self.mlp[0].weight.dtype))  # (B, C)


class Attention(nn.Cell):
    """Self-attention with 2-D RoPE plus gated cross-attention to the caption, sharing the rotated queries."""

    def __init__(self, cfg: NextDiTConfig):
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
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # LayerNorm across all heads jointly, before the split into heads
            self.q_norm = LayerNorm(d)
            self.k_norm = LayerNorm(kv)
            self.ky_norm = LayerNorm(kv)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.fused = backend.use_fused_kernels()

    def construct(self, x, cos, sin, gain, y, y_mask):
        b, seq, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)  # (B, L, N*D), (B, L, Nkv*D) x2
        yk = self.wk_y(y)  # (B, Lc, Nkv*D)
        if self.qk_norm:
            xq, xk, yk = self.q_norm(xq), self.k_norm(xk), self.ky_norm(yk)
        xq = rope.apply_rope(xq.reshape(b, seq, self.n_heads, self.head_dim), cos, sin)  # (B, L, N, D)
        xk = rope.apply_rope(xk.reshape(b, seq, self.n_kv_heads, self.head_dim), cos, sin)  # (B, L, Nkv, D)
        xv = xv.reshape(b, seq, self.n_kv_heads, self.head_dim)
        # proportional attention multiplies the self-attention softmax scale only; the cross branch keeps 1/sqrt(D)
        out = backend.attention(xq * gain.astype(xq.dtype), xk, xv, None, self.scale, self.fused)  # (B, L, N, D)
        yk = yk.reshape(b, -1, self.n_kv_heads, self.head_dim)  # (B, Lc, Nkv, D)
        yv = self.wv_y(y).reshape(b, -1, self.n_kv_heads, self.head_dim)
        out_y = backend.attention(xq, yk, yv, y_mask, self.scale, self.fused)  # (B, L, N, D)
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


class TransformerBlock(nn.Cell):
    """Scale-only adaLN with tanh gates and sandwich RMSNorms around attention and FFN."""

    def __init__(self, cfg: NextDiTConfig):
        super().__init__()
        d, eps = cfg.dim, cfg.norm_eps
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(d, cfg.ffn_hidden)
        self.attention_norm1 = RMSNorm(d, eps)
        self.ffn_norm1 = RMSNorm(d, eps)
        self.attention_norm2 = RMSNorm(d, eps)
        self.ffn_norm2 = RMSNorm(d, eps)
        self.adaLN_modulation = nn.SequentialCell([nn.SiLU(), _zero_linear(cfg.cond_dim, 4 * d)])
        self.attention_y_norm = RMSNorm(cfg.cap_feat_dim, eps)

    def construct(self, x, cos, sin, gain, y, y_mask, c):
        scale_msa, gate_msa, scale_mlp, gate_mlp = mint.chunk(self.adaLN_modulation(c), 4, dim=1)  # (B, dim) x4
        h = self.attention_norm1(x) * (1 + scale_msa.unsqueeze(1))
        h = self.attention(h, cos, sin, gain, self.attention_y_norm(y), y_mask)
        x = x + mint.tanh(gate_msa).unsqueeze(1) * self.attention_norm2(h)
        h = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp.unsqueeze(1)))
        return x + mint.tanh(gate_mlp).unsqueeze(1) * self.ffn_norm2(h)  # (B, L, dim)


class FinalLayer(nn.Cell):
    """LayerNorm (no affine, eps 1e-6) scaled by (1 + adaLN(c)), then a linear to patch pixels."""

    def __init__(self, cfg: NextDiTConfig):
        super().__init__()
        self.norm_final = LayerNorm(cfg.dim, eps=1e-6, affine=False)
        self.linear = _zero_linear(cfg.dim, cfg.patch_size**2 * cfg.out_channels)
        self.adaLN_modulation = nn.SequentialCell([nn.SiLU(), _zero_linear(cfg.cond_dim, cfg.dim)])

    def construct(self, x, c):
        scale = self.adaLN_modulation(c)  # (B, dim)
        return self.linear(self.norm_final(x) * (1 + scale.unsqueeze(1)))  # (B, L, p*p*C_out)


# ------------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------------
class CheckedInputs:
    """``check_inputs`` before the graph runs, for the Lumina DiTs (construct contract of ``NextDiT``); the model
    gives ``cfg`` and ``token_count(height, width)``."""

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


class NextDiT(CheckedInputs, nn.Cell):
    """Next-DiT velocity model ``v(x_t, t, caption)``.

    ``construct(x, t, cap_feats, cap_mask, rope_cos, rope_sin, attn_gain)``:
        x (B, C, H, W) latents; t (B,) in [0, 1]; cap_feats (B, Lc, cap_feat_dim); cap_mask (B, Lc), 1 = token;
        rope_cos / rope_sin (L, head_dim/2) float32 with L = (H/p)(W/p) (``rope.nextdit_rope``); attn_gain (1,)
        float32, the proportional-attention factor (``rope.proportional_attention_gain``).
        Returns the velocity (B, C, H, W). ``forward`` below builds the tables from scaling settings.
    """

    def __init__(self, cfg: NextDiTConfig):
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
        self.pad_token = Parameter(
            ms.common.initializer.initializer(_normal(0.02), (d,), ms.float32)
        )  # only used by the original's list path

    def token_count(self, height: int, width: int) -> int:
        return (height // self.cfg.patch_size) * (width // self.cfg.patch_size)

    def embed(self, x, t, cap_feats, cap_mask):
        """Patchify and embed: (tokens (B, L, dim), conditioning (B, cond), caption mask (B, Lc) bool), the inputs of
        every block (``parity.BlockTrace`` runs the blocks from here)."""
        b, c, h, w = x.shape
        p = self.cfg.patch_size
        gh, gw = h // p, w // p
        x = mint.permute(x.reshape(b, c, gh, p, gw, p), (0, 2, 4, 1, 3, 5)).reshape(b, gh * gw, c * p * p)  # (c,ph,pw)
        x = self.x_embedder(x)  # (B, L, dim)

        mask = cap_mask.astype(ms.float32).unsqueeze(2)  # (B, Lc, 1)
        pooled = (cap_feats.astype(ms.float32) * mask).sum(axis=1) / mask.sum(axis=1)  # masked mean, (B, Dc)
        c_emb = self.t_embedder(t) + self.cap_embedder(pooled.astype(cap_feats.dtype))  # (B, cond)
        return x, c_emb, cap_mask.astype(ms.bool_)

    def unembed(self, x, c_emb, height: int, width: int):
        """Final layer and unpatchify: tokens (B, L, dim) -> velocity (B, C, H, W), the learned-sigma half dropped."""
        b, p, c_out = x.shape[0], self.cfg.patch_size, self.cfg.out_channels
        x = self.final_layer(x, c_emb)  # (B, L, p*p*C_out), token vector read as (ph, pw, c)
        x = mint.permute(x.reshape(b, height // p, width // p, p, p, c_out), (0, 5, 1, 3, 2, 4))
        x = x.reshape(b, c_out, height, width)
        if self.cfg.learn_sigma:
            x = x[:, : self.cfg.in_channels]
        return x  # (B, C, H, W)

    def construct(self, x, t, cap_feats, cap_mask, rope_cos, rope_sin, attn_gain):
        h, w = x.shape[2], x.shape[3]
        x, c_emb, y_mask = self.embed(x, t, cap_feats, cap_mask)  # (B, L, dim), (B, cond), (B, Lc)
        for layer in self.layers:
            x = layer(x, rope_cos, rope_sin, attn_gain, cap_feats, y_mask, c_emb)
        return self.unembed(x, c_emb, h, w)


class SharedBlockNextDiT:
    """``NextDiT`` inference with one compiled block graph that every layer runs through in turn.

    CPU graph mode gives each compiled block its own workspace and keeps it, so the memory of a whole-model graph
    grows with depth (measured: +1.14 GiB per 768-wide block at 4096 tokens; a 12-block model at 1024² does not fit
    24 GiB). Here a single ``TransformerBlock`` is compiled once per input shape and each layer's weights are bound
    to it (``Parameter.set_data``) before it runs, so the workspace is that of one block. Same call contract and the
    same numbers as ``NextDiT`` (tested bitwise); inference only, as the bound weights are not trained.
    """

    def __init__(self, model: NextDiT):
        self.model, self.cfg = model, model.cfg
        # in the model's dtype: set_data of another dtype would cast (copy) instead of aliasing
        self.block = cast_parameters(TransformerBlock(model.cfg), next(iter(model.get_parameters())).dtype)
        self._slots = list(self.block.get_parameters())
        self._weights = [list(layer.get_parameters()) for layer in model.layers]
        assert all([a.shape for a in self._slots] == [b.shape for b in w] for w in self._weights)

    # jit methods, not wrapper Cells: a Cell holding the model as a child would rename its parameters ("model.*")
    @ms.jit
    def _embed(self, x, t, cap_feats, cap_mask):
        return self.model.embed(x, t, cap_feats, cap_mask)

    @ms.jit
    def _unembed(self, x, c_emb, height: int, width: int):  # ints are constants: one small graph per size
        return self.model.unembed(x, c_emb, height, width)

    def __call__(self, x, t, cap_feats, cap_mask, rope_cos, rope_sin, attn_gain):
        self.model.check_inputs(x, t, cap_feats, cap_mask, rope_cos, rope_sin)
        h, w = x.shape[2], x.shape[3]
        x, c_emb, y_mask = self._embed(x, t, cap_feats, cap_mask)  # (B, L, dim), (B, cond), (B, Lc)
        for weights in self._weights:
            for slot, weight in zip(self._slots, weights):
                slot.set_data(weight)
            x = self.block(x, rope_cos, rope_sin, attn_gain, cap_feats, y_mask, c_emb)
        return self._unembed(x, c_emb, h, w)


def _normal(std: float):
    return ms.common.initializer.Normal(sigma=std)


def _zero_linear(in_dim: int, out_dim: int) -> nn.Dense:
    return nn.Dense(in_dim, out_dim, weight_init="zeros", bias_init="zeros")


# ------------------------------------------------------------------------------------------------------------------
# Calling conventions of the original: plain forward and forward_with_cfg
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RopeScaling:
    """Resolution extrapolation settings (spec: scale factor sqrt(W*H)/1024 beyond the training area).

    ``scale_factor`` 1 disables scaling. ``timestep`` decides PI (t < watershed) or NTK; ``smooth`` selects the
    paper's smooth formula instead of the released hard switch. ``base_seqlen`` turns proportional attention on.
    """

    scale_factor: float = 1.0
    scale_watershed: float = 1.0
    smooth: bool = False
    base_seqlen: int | None = None


def rope_inputs(cfg: NextDiTConfig, height: int, width: int, timestep: float, scaling: RopeScaling = RopeScaling()):
    """(rope_cos, rope_sin, attn_gain) Tensors for a latent of ``height x width`` at Lumina time ``timestep``."""
    gh, gw = height // cfg.patch_size, width // cfg.patch_size
    cos, sin = rope.nextdit_rope(
        cfg.head_dim, gh, gw, scaling.scale_factor, scaling.scale_watershed, timestep, scaling.smooth
    )
    gain = rope.proportional_attention_gain(gh * gw, scaling.base_seqlen)
    return Tensor(cos), Tensor(sin), Tensor(np.array([gain], np.float32))


def forward(model: NextDiT, x, t, cap_feats, cap_mask, scaling: RopeScaling = RopeScaling()):
    """The original ``NextDiT.forward`` (scaling off) or its scaled variant; the time-aware switch reads ``t[0]``."""
    t0 = float(t[0].asnumpy()) if isinstance(t, Tensor) else float(np.asarray(t)[0])
    cos, sin, gain = rope_inputs(model.cfg, x.shape[2], x.shape[3], t0, scaling)
    return model(x, t, cap_feats, cap_mask, cos, sin, gain)


def forward_with_cfg(
    model, x, t, cap_feats, cap_mask, cfg_scale: float, scaling=RopeScaling(), guided_channels=3, run=None
):
    """The original ``forward_with_cfg``: the first half of ``x`` is run with captions [cond, uncond], guidance on
    the first ``guided_channels`` channels (3, as the original; None = all).

    Returns the full batch as the original does: the guided channels repeated for both halves, the unguided channels
    (channel 3 by default) as each half computed them. ``run``: the family's ``forward`` (Flag-DiT passes its own).
    """
    half = x[: x.shape[0] // 2]
    out = (forward if run is None else run)(model, mint.cat([half, half], dim=0), t, cap_feats, cap_mask, scaling)
    guided = combine_guidance(out, cfg_scale, None)  # (B/2, C, H, W)
    k = out.shape[1] if guided_channels is None else guided_channels
    return mint.cat([mint.cat([guided[:, :k], guided[:, :k]], dim=0), out[:, k:]], dim=1)


# ------------------------------------------------------------------------------------------------------------------
# Checkpoint layouts: original Lumina-T2X names are the project's names; diffusers ``LuminaNextDiT2DModel`` maps
# by this table (spec section 7). diffusers stores wq and q_norm twice (attn1 and attn2); the copies must agree.
# ------------------------------------------------------------------------------------------------------------------
DIFFUSERS_RULES = RuleTable(
    "nextdit-diffusers",
    (
        ("pad_token", ("pad_token",)),
        ("x_embedder.weight", ("patch_embedder.proj.weight",)),
        ("x_embedder.bias", ("patch_embedder.proj.bias",)),
        ("t_embedder.mlp.0.weight", ("time_caption_embed.timestep_embedder.linear_1.weight",)),
        ("t_embedder.mlp.0.bias", ("time_caption_embed.timestep_embedder.linear_1.bias",)),
        ("t_embedder.mlp.2.weight", ("time_caption_embed.timestep_embedder.linear_2.weight",)),
        ("t_embedder.mlp.2.bias", ("time_caption_embed.timestep_embedder.linear_2.bias",)),
        ("cap_embedder.0.weight", ("time_caption_embed.caption_embedder.0.weight",)),
        ("cap_embedder.0.bias", ("time_caption_embed.caption_embedder.0.bias",)),
        ("cap_embedder.1.weight", ("time_caption_embed.caption_embedder.1.weight",)),
        ("cap_embedder.1.bias", ("time_caption_embed.caption_embedder.1.bias",)),
        ("layers.{i}.attention.gate", ("layers.{i}.gate",)),
        ("layers.{i}.adaLN_modulation.1.weight", ("layers.{i}.norm1.linear.weight",)),
        ("layers.{i}.adaLN_modulation.1.bias", ("layers.{i}.norm1.linear.bias",)),
        ("layers.{i}.attention_norm1.weight", ("layers.{i}.norm1.norm.weight",)),
        ("layers.{i}.attention_norm2.weight", ("layers.{i}.norm2.weight",)),
        ("layers.{i}.ffn_norm1.weight", ("layers.{i}.ffn_norm1.weight",)),
        ("layers.{i}.ffn_norm2.weight", ("layers.{i}.ffn_norm2.weight",)),
        ("layers.{i}.attention_y_norm.weight", ("layers.{i}.norm1_context.weight",)),
        ("layers.{i}.attention.wq.weight", ("layers.{i}.attn1.to_q.weight", "layers.{i}.attn2.to_q.weight")),
        ("layers.{i}.attention.wk.weight", ("layers.{i}.attn1.to_k.weight",)),
        ("layers.{i}.attention.wv.weight", ("layers.{i}.attn1.to_v.weight",)),
        ("layers.{i}.attention.wk_y.weight", ("layers.{i}.attn2.to_k.weight",)),
        ("layers.{i}.attention.wv_y.weight", ("layers.{i}.attn2.to_v.weight",)),
        ("layers.{i}.attention.wo.weight", ("layers.{i}.attn2.to_out.0.weight",)),
        ("layers.{i}.attention.q_norm.weight", ("layers.{i}.attn1.norm_q.weight", "layers.{i}.attn2.norm_q.weight")),
        ("layers.{i}.attention.q_norm.bias", ("layers.{i}.attn1.norm_q.bias", "layers.{i}.attn2.norm_q.bias")),
        ("layers.{i}.attention.k_norm.weight", ("layers.{i}.attn1.norm_k.weight",)),
        ("layers.{i}.attention.k_norm.bias", ("layers.{i}.attn1.norm_k.bias",)),
        ("layers.{i}.attention.ky_norm.weight", ("layers.{i}.attn2.norm_k.weight",)),
        ("layers.{i}.attention.ky_norm.bias", ("layers.{i}.attn2.norm_k.bias",)),
        ("layers.{i}.feed_forward.w1.weight", ("layers.{i}.feed_forward.linear_1.weight",)),
        ("layers.{i}.feed_forward.w2.weight", ("layers.{i}.feed_forward.linear_2.weight",)),
        ("layers.{i}.feed_forward.w3.weight", ("layers.{i}.feed_forward.linear_3.weight",)),
        ("final_layer.adaLN_modulation.1.weight", ("norm_out.linear_1.weight",)),
        ("final_layer.adaLN_modulation.1.bias", ("norm_out.linear_1.bias",)),
        ("final_layer.linear.weight", ("norm_out.linear_2.weight",)),
        ("final_layer.linear.bias", ("norm_out.linear_2.bias",)),
    ),
)
