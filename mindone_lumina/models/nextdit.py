"""Next-DiT, the flow-matching diffusion transformer of Lumina-Next, in MindSpore.

Ported from Lumina-T2X ``lumina_next_t2i_mini/models/nextdit.py`` (commit 1c60696; itself derived from Meta's DiT,
CC-BY-NC, and Lumina-T2X, MIT). Parameter names are the original checkpoint names. The parts shared with Flag-DiT are
in ``dit_blocks.py``; what is Next-DiT's own is here: 2-D RoPE, four-way adaLN with tanh gates and sandwich
RMSNorms, a final layer that only scales. Deviations from the original, all deliberate:

* RoPE tables and the proportional-attention gain are inputs of ``construct`` (built on the host by ``rope.py``),
  never module state rewritten per step as the original ``forward_with_cfg`` does.
* Only the batched tensor path (all images of a batch share one size, image mask all ones) is implemented.
* The model returns the velocity only (the learned-sigma half is dropped inside ``construct``, as the original).
* ``separate_cross_query`` (not in the original) gives the cross-attention its own query, for diffusers-trained
  weights (``dit_blocks.Attention``).
* Context Drop (``context_drop.py``; the paper's, not in the released code): self-attention with merged keys and
  values in chosen layers, when its pooling tables are passed to ``construct``; without them the original's path.

Time convention: ``t`` in [0, 1], t = 0 is noise and t = 1 is data (see ``sampling.py``).
"""

from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Tensor, mint, nn

from .. import rope
from . import dit_blocks, lora
from .dit_blocks import Attention, CheckedInputs, DiTShape, FeedForward
from .layers import RMSNorm, cast_parameters, zero_linear


@dataclass(frozen=True)
class NextDiTConfig(DiTShape):
    """Keyword arguments of the original ``NextDiT`` constructor (same names and defaults), plus
    ``separate_cross_query``. ``scale_factor`` and ``use_flash_attn`` are run-time settings of the original."""

    FAMILY = "Next-DiT"
    IGNORED_ARGS = ("scale_factor", "use_flash_attn")
    ROPE, ROPE_DIVISOR = "2-D", 4  # half the head for rows, half for columns, in pairs

    separate_cross_query: bool = False

    def num_parameters(self) -> int:
        d, c = self.dim, self.cond_dim
        block, outside = self.shared_parameters()
        block += 4 * d + (c + 1) * 4 * d  # four RMSNorms, adaLN
        if self.separate_cross_query:
            block += d * d + (2 * d if self.qk_norm else 0)
        return outside + self.n_layers * block + (c + 1) * d  # final adaLN


PRESETS = {
    # Lumina-Next-T2I and Lumina-Next-SFT (the released checkpoints): NextDiT_2B_GQA_patch2 with --qk_norm, Gemma-2B.
    "nextdit-2b-gqa": NextDiTConfig(dim=2304, n_layers=24, n_heads=32, n_kv_heads=8, qk_norm=True, cap_feat_dim=2048),
    # NextDiT_2B_patch2: the same without grouped kv heads.
    "nextdit-2b": NextDiTConfig(dim=2304, n_layers=24, n_heads=32, qk_norm=True, cap_feat_dim=2048),
}


def resolve_config(arch) -> NextDiTConfig:
    """A preset name, a path to a JSON of constructor arguments, a dict, or a config."""
    return NextDiTConfig.resolve(arch, PRESETS)


class TransformerBlock(nn.Cell):
    """Scale-only adaLN with tanh gates and sandwich RMSNorms around attention and FFN."""

    def __init__(self, cfg: NextDiTConfig):
        super().__init__()
        d, eps = cfg.dim, cfg.norm_eps
        self.attention = Attention(cfg, cfg.separate_cross_query)
        self.feed_forward = FeedForward(d, cfg.ffn_hidden)
        self.attention_norm1 = RMSNorm(d, eps)
        self.ffn_norm1 = RMSNorm(d, eps)
        self.attention_norm2 = RMSNorm(d, eps)
        self.ffn_norm2 = RMSNorm(d, eps)
        self.adaLN_modulation = nn.SequentialCell([nn.SiLU(), zero_linear(cfg.cond_dim, 4 * d)])
        self.attention_y_norm = RMSNorm(cfg.cap_feat_dim, eps)

    def construct(self, x, cos, sin, gain, y, y_mask, c, merge_index=None, merge_weight=None):
        scale_msa, gate_msa, scale_mlp, gate_mlp = mint.chunk(self.adaLN_modulation(c), 4, dim=1)  # (B, dim) x4
        h = self.attention_norm1(x, 1 + scale_msa)
        h = self.attention(h, cos, sin, gain, self.attention_y_norm(y), y_mask, merge_index, merge_weight)
        x = x + self.attention_norm2(h, mint.tanh(gate_msa))
        h = self.feed_forward(self.ffn_norm1(x, 1 + scale_mlp))
        return x + self.ffn_norm2(h, mint.tanh(gate_mlp))  # (B, L, dim)


class NextDiT(CheckedInputs, nn.Cell):
    """Next-DiT velocity model ``v(x_t, t, caption)``.

    ``construct(x, t, cap_feats, cap_mask, rope_cos, rope_sin, attn_gain[, merge_index, merge_weight,
    merge_layers])``:
        x (B, C, H, W) latents; t (B,) in [0, 1]; cap_feats (B, Lc, cap_feat_dim); cap_mask (B, Lc), 1 = token;
        rope_cos / rope_sin (L, head_dim/2) float32 with L = (H/p)(W/p) (``rope_inputs``); attn_gain (1,) float32,
        the proportional-attention factor (``rope.proportional_attention_gain``). Context Drop (``context_drop.py``):
        merge_index / merge_weight, the pooling tables of the (H/p, W/p) grid (``context_drop.merge_inputs``), used
        by the layers in the tuple of ints ``merge_layers`` (None: all). Returns the velocity (B, C, H, W).
    """

    def __init__(self, cfg: NextDiTConfig):
        super().__init__()
        self.cfg = cfg
        dit_blocks.build(self, cfg, TransformerBlock, final_shift=False)

    def token_count(self, height: int, width: int) -> int:
        return (height // self.cfg.patch_size) * (width // self.cfg.patch_size)

    def embed(self, x, t, cap_feats, cap_mask):
        """(tokens (B, L, dim), conditioning (B, cond), caption mask (B, Lc) bool): the inputs of every block."""
        tokens = self.x_embedder(dit_blocks.patchify(x, self.cfg.patch_size))  # (B, H/p, W/p, dim)
        c_emb, y_mask = dit_blocks.conditioning(self, t, cap_feats, cap_mask)
        return tokens.reshape(x.shape[0], -1, self.cfg.dim), c_emb, y_mask

    def unembed(self, x, c_emb, height: int, width: int):
        """Final layer and unpatchify: tokens (B, L, dim) -> velocity (B, C, H, W)."""
        p = self.cfg.patch_size
        x = self.final_layer(x, c_emb).reshape(x.shape[0], height // p, width // p, -1)  # (B, H/p, W/p, p*p*C_out)
        return dit_blocks.unpatchify(x, p, self.cfg.out_channels, self.cfg.in_channels)

    def construct(self, x, t, cap_feats, cap_mask, rope_cos, rope_sin, attn_gain, merge_index=None,
                  merge_weight=None, merge_layers=None):  # fmt: skip
        h, w = x.shape[2], x.shape[3]
        x, c_emb, y_mask = self.embed(x, t, cap_feats, cap_mask)  # (B, L, dim), (B, cond), (B, Lc)
        merged = merged_layers(len(self.layers), merge_index is not None, merge_layers)  # graph constants
        for i, layer in enumerate(self.layers):
            if merged[i]:
                x = layer(x, rope_cos, rope_sin, attn_gain, cap_feats, y_mask, c_emb, merge_index, merge_weight)
            else:
                x = layer(x, rope_cos, rope_sin, attn_gain, cap_feats, y_mask, c_emb)
        return self.unembed(x, c_emb, h, w)


def merged_layers(n_layers: int, merging: bool, layers=None) -> tuple:
    """Per layer, whether it runs Context Drop: none unless ``merging``, else those in ``layers`` (None: all)."""
    return tuple(merging and (layers is None or i in layers) for i in range(n_layers))


class SharedBlockNextDiT:
    """``NextDiT`` inference with one compiled block graph that every layer runs through in turn.

    CPU graph mode gives each compiled block its own workspace and keeps it, so the memory of a whole-model graph
    grows with depth (measured: +1.14 GiB per 768-wide block at 4096 tokens; a 12-block model at 1024² does not fit
    24 GiB). Here a single ``TransformerBlock`` is compiled once per input shape and each layer's weights are bound
    to it (``Parameter.set_data``) before it runs, so the workspace is that of one block. Same call contract and the
    same numbers as ``NextDiT`` (tested bitwise); inference only, as the bound weights are not trained.
    """

    def __init__(self, model: NextDiT):
        assert self.supports(model), "the layers differ in structure: run the model itself"
        self.model, self.cfg = model, model.cfg
        # the first layer's structure (LoRA adapters and their scales included: constants of the graph), in the model's
        # dtype: set_data of another dtype would cast (copy) instead of aliasing
        block = lora.mirror(TransformerBlock(model.cfg), model.layers[0])
        self.block = cast_parameters(block, next(iter(model.get_parameters())).dtype)
        self._slots = list(self.block.get_parameters())
        self._weights = [list(layer.get_parameters()) for layer in model.layers]

    @staticmethod
    def supports(model: NextDiT) -> bool:
        """Whether one block graph can run every layer: the same Cells, settings and parameter shapes and dtypes (a
        LoRA adapter loaded with a per-layer rank or scale makes the layers differ)."""

        def signature(layer):
            cells = [(n, type(c).__name__, getattr(c, "scale", None), getattr(c, "separate", None))
                     for n, c in layer.cells_and_names()]  # fmt: skip
            return cells, [(n, tuple(p.shape), p.dtype) for n, p in layer.parameters_and_names()]

        layers = list(model.layers)  # not model.layers[1:]: a sliced CellList renames the parameters it holds
        return all(signature(layer) == signature(layers[0]) for layer in layers[1:])

    # jit methods, not wrapper Cells: a Cell holding the model as a child would rename its parameters ("model.*")
    @ms.jit
    def _embed(self, x, t, cap_feats, cap_mask):
        return self.model.embed(x, t, cap_feats, cap_mask)

    @ms.jit
    def _unembed(self, x, c_emb, height: int, width: int):  # ints are constants: one small graph per size
        return self.model.unembed(x, c_emb, height, width)

    def __call__(self, x, t, cap_feats, cap_mask, rope_cos, rope_sin, attn_gain, merge_index=None,
                 merge_weight=None, merge_layers=None):  # fmt: skip
        self.model.check_inputs(x, t, cap_feats, cap_mask, rope_cos, rope_sin)
        h, w = x.shape[2], x.shape[3]
        x, c_emb, y_mask = self._embed(x, t, cap_feats, cap_mask)  # (B, L, dim), (B, cond), (B, Lc)
        merged = merged_layers(len(self._weights), merge_index is not None, merge_layers)
        for weights, merge in zip(self._weights, merged):
            for slot, weight in zip(self._slots, weights):
                slot.set_data(weight)
            # the block has two graphs per shape: with Context Drop's tables as inputs, and without
            tables = (merge_index, merge_weight) if merge else ()
            x = self.block(x, rope_cos, rope_sin, attn_gain, cap_feats, y_mask, c_emb, *tables)
        return self._unembed(x, c_emb, h, w)


# ------------------------------------------------------------------------------------------------------------------
# The original's calling convention: RoPE tables from scaling settings, the time-aware switch on t[0]
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


def forward(model, x, t, cap_feats, cap_mask, scaling: RopeScaling = RopeScaling()):
    """The original ``NextDiT.forward`` (scaling off) or its scaled variant; the time-aware switch reads ``t[0]``."""
    t0 = float(t[0].asnumpy()) if isinstance(t, Tensor) else float(np.asarray(t)[0])
    cos, sin, gain = rope_inputs(model.cfg, x.shape[2], x.shape[3], t0, scaling)
    return model(x, t, cap_feats, cap_mask, cos, sin, gain)
