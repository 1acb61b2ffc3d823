"""Flag-DiT, the 5B diffusion transformer of Lumina-T2I (the first Lumina-T2X model), in MindSpore.

Ported from Lumina-T2X ``lumina_t2i/models/model.py`` (``DiT_Llama``, commit 1c60696; itself derived from Meta's DiT,
CC-BY-NC, and Lumina-T2X, MIT), with fairscale's model-parallel layers replaced by the plain layers they reduce to at
world size 1. Parameter names are the original checkpoint names. The parts shared with Next-DiT are in
``dit_blocks.py``; what differs (spec section 1.2) is here:

* 1-D RoPE over the flattened token sequence, with a learnable ``eol_token`` ([nextline]) after every row of patches:
  L = (H/p)(W/p + 1). ``rope_scaling_factor`` divides the positions, ``ntk_factor`` multiplies theta.
* Six-way adaLN (shift, scale, gate for attention and FFN), gates not tanh'd, pre-norms only.
* The final layer shifts as well as scales.

Deviations, as in ``nextdit.py``: RoPE tables and the proportional-attention gain are ``construct`` inputs; only the
batched tensor path is implemented; the learned-sigma half is dropped inside ``construct``. Time convention: t in
[0, 1], t = 0 is noise and t = 1 is data.
"""

from dataclasses import dataclass

import numpy as np

from mindspore import Tensor, mint, nn

from .. import backend, rope
from . import dit_blocks
from .dit_blocks import Attention, CheckedInputs, DiTShape, FeedForward
from .layers import RMSNorm, zero_linear


@dataclass(frozen=True)
class FlagDiTConfig(DiTShape):
    """Keyword arguments of the original ``DiT_Llama`` constructor (same names and defaults).

    ``rope_scaling_factor`` and ``ntk_factor`` change no parameter: they are the RoPE scaling ``forward`` uses when
    the caller gives none, as the original's constructor sets its ``freqs_cis``.
    """

    FAMILY = "Flag-DiT"
    ROPE, ROPE_DIVISOR = "1-D", 2  # 1-D RoPE rotates pairs

    rope_scaling_factor: float = 1.0
    ntk_factor: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        for name in ("rope_scaling_factor", "ntk_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def num_parameters(self) -> int:
        d, c = self.dim, self.cond_dim
        block, outside = self.shared_parameters()
        block += 2 * d + (c + 1) * 6 * d  # attention_norm, ffn_norm, 6-way adaLN
        return outside + d + self.n_layers * block + (c + 1) * 2 * d  # eol_token, final adaLN


PRESETS = {
    # Lumina-T2I: DiT_Llama_5B_patch2 with --qk_norm, conditioned on LLaMA-2-7B (hidden 4096).
    "flagdit-5b": FlagDiTConfig(dim=3072, n_layers=32, n_heads=32, qk_norm=True, cap_feat_dim=4096),
}


def resolve_config(arch) -> FlagDiTConfig:
    """A preset name, a path to a JSON of constructor arguments, a dict, or a config."""
    return FlagDiTConfig.resolve(arch, PRESETS)


def token_count(cfg: FlagDiTConfig, height: int, width: int) -> int:
    """Tokens of a ``height x width`` latent: rows of W/p patches, each followed by an ``eol_token``."""
    return (height // cfg.patch_size) * (width // cfg.patch_size + 1)


class TransformerBlock(nn.Cell):
    """Six-way adaLN (shift, scale, untanh'd gate) around pre-normed attention and FFN."""

    def __init__(self, cfg: FlagDiTConfig):
        super().__init__()
        d, eps = cfg.dim, cfg.norm_eps
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(d, cfg.ffn_hidden)
        self.attention_norm = RMSNorm(d, eps)
        self.ffn_norm = RMSNorm(d, eps)
        self.adaLN_modulation = nn.SequentialCell([nn.SiLU(), zero_linear(cfg.cond_dim, 6 * d)])
        self.attention_y_norm = RMSNorm(cfg.cap_feat_dim, eps)
        self.fused = backend.use_fused_kernels()

    def construct(self, x, cos, sin, gain, y, y_mask, c):
        mod = mint.chunk(self.adaLN_modulation(c), 6, dim=1)  # (B, dim) x6
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        length, fused = x.shape[1], self.fused
        h = self.attention_norm(x, 1 + scale_msa, shift_msa)
        x = x + backend.spread_tokens(gate_msa, length, fused) * self.attention(
            h, cos, sin, gain, self.attention_y_norm(y), y_mask
        )
        h = self.ffn_norm(x, 1 + scale_mlp, shift_mlp)
        return x + backend.spread_tokens(gate_mlp, length, fused) * self.feed_forward(h)  # (B, L, dim)


class FlagDiT(CheckedInputs, nn.Cell):
    """Flag-DiT velocity model ``v(x_t, t, caption)``, with the construct contract of ``nextdit.NextDiT``; its RoPE
    tables are (L, head_dim/2) with L = (H/p)(W/p + 1) (``rope_inputs``)."""

    def __init__(self, cfg: FlagDiTConfig):
        super().__init__()
        self.cfg = cfg
        dit_blocks.build(self, cfg, TransformerBlock, final_shift=True, tokens=("eol_token", "pad_token"))

    def token_count(self, height: int, width: int) -> int:
        return token_count(self.cfg, height, width)

    def construct(self, x, t, cap_feats, cap_mask, rope_cos, rope_sin, attn_gain):
        p, d = self.cfg.patch_size, self.cfg.dim
        b, gh, gw = x.shape[0], x.shape[2] // p, x.shape[3] // p
        x = self.x_embedder(dit_blocks.patchify(x, p))  # (B, gh, gw, dim)
        eol = mint.broadcast_to(self.eol_token.astype(x.dtype).reshape(1, 1, 1, d), (b, gh, 1, d))
        x = mint.cat([x, eol], dim=2).reshape(b, gh * (gw + 1), d)  # (B, L, dim), L = gh (gw + 1)
        c_emb, y_mask = dit_blocks.conditioning(self, t, cap_feats, cap_mask)
        for layer in self.layers:
            x = layer(x, rope_cos, rope_sin, attn_gain, cap_feats, y_mask, c_emb)
        x = self.final_layer(x, c_emb).reshape(b, gh, gw + 1, -1)[:, :, :gw]  # drop the eol column
        return dit_blocks.unpatchify(x, p, self.cfg.out_channels, self.cfg.in_channels)  # (B, C, H, W)


# ------------------------------------------------------------------------------------------------------------------
# The original's calling convention and the Lumina-T2I demo's RoPE settings
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
    cos, sin = rope.flagdit_rope(cfg.head_dim, seq, factor, ntk)
    gain = rope.proportional_attention_gain(seq, scaling.base_seqlen)
    return Tensor(cos), Tensor(sin), Tensor(np.array([gain], np.float32))


def forward(model, x, t, cap_feats, cap_mask, scaling: RopeScaling = RopeScaling()):
    """The original ``DiT_Llama.forward`` (default scaling) or its scaled variant."""
    cos, sin, gain = rope_inputs(model.cfg, x.shape[2], x.shape[3], scaling)
    return model(x, t, cap_feats, cap_mask, cos, sin, gain)


def attention_base_seqlen(train_size: int = 1024, size_multiple: int = 16) -> int:
    """The demo's proportional-attention base: ``(1024/16)^2 + (1024/16) * 2`` = 4224 tokens."""
    side = train_size // size_multiple
    return side * side + side * 2


def ntk_factor_for(height_px: int, width_px: int, train_size: int = 1024, size_multiple: int = 16) -> float:
    """The demo's ``ntk_factor`` for an image size: patch-grid area over the training area (1 at 1024^2)."""
    return (width_px // size_multiple) * (height_px // size_multiple) / (train_size // size_multiple) ** 2
