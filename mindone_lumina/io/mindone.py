"""The project's Next-DiT, Gemma encoder and VAE inside ``mindone.diffusers`` pipelines, and the diffusers layout.

``mindone.diffusers`` 0.5.0 ``LuminaPipeline`` (and its deprecated alias ``LuminaText2ImgPipeline``) calls its parts as
diffusers' PyTorch classes are called. The adapters below give the project's Cells exactly that surface:

- ``transformer(hidden_states, timestep, encoder_hidden_states, encoder_mask, image_rotary_emb,
  cross_attention_kwargs, return_dict)`` with ``image_rotary_emb`` the complex (384, 384, D/2) table of
  ``get_2d_rotary_pos_embed_lumina``, ``cross_attention_kwargs["base_sequence_length"]`` for proportional attention,
  Lumina time (0 noise, 1 data) as ``timestep``, and a 2C-channel output whose first C channels are the velocity
  (the pipeline keeps ``chunk(2, dim=1)[0]``, diffusers' ``learn_sigma`` layout); ``.config``, ``.head_dim``.
- ``text_encoder(input_ids, attention_mask=, output_hidden_states=True).hidden_states[-2]``, ``.dtype``.
- ``vae.decode(latents, return_dict=False)[0]``, ``vae.config.scaling_factor``.

On CPU, mindone's ``get_2d_rotary_pos_embed_lumina`` cannot run (``mint.arange`` has no CPU kernel), so
``mindone_pipeline`` installs ``portable_rope_table`` (the same complex table, built by NumPy from
``rope.frequencies``) in mindone's Lumina pipeline module there. On Ascend mindone's own function is left in place.

Folders in the diffusers layout, which mindone's own classes load too, are written by ``diffusers_io``.
"""

import dataclasses
from types import SimpleNamespace

import numpy as np

import mindspore as ms
from mindspore import Tensor, mint

from .. import backend, rope
from ..models import nextdit
from ..models import vae as vae_lib
from ..text.gemma import GemmaConfig
from .diffusers_io import transformer_config_json, vae_config_json


class FrozenConfig(dict):
    """A read-only dict with attribute access, as diffusers' ``FrozenDict`` configs are read."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no field {name!r}") from None

    def __setitem__(self, key, value):
        raise TypeError("the config of an adapted component is read-only")


# ------------------------------------------------------------------------------------------------------------------
# Adapters
# ------------------------------------------------------------------------------------------------------------------
class NextDiTAdapter:
    """A ``NextDiT`` called as diffusers' ``LuminaNextDiT2DModel`` is (module docstring)."""

    def __init__(self, model: nextdit.NextDiT, sample_size: int):
        if not isinstance(model, nextdit.NextDiT):
            raise ValueError(f"expected a NextDiT, got {type(model).__name__}")
        self.model = model
        self.config = FrozenConfig(transformer_config_json(model.cfg, sample_size))
        self.head_dim = model.cfg.head_dim

    @property
    def dtype(self):
        return self.model.x_embedder.weight.dtype

    def __call__(
        self,
        hidden_states,
        timestep,
        encoder_hidden_states,
        encoder_mask,
        image_rotary_emb,
        cross_attention_kwargs=None,
        return_dict=True,
    ):
        cfg = self.model.cfg
        b, _, h, w = hidden_states.shape
        gh, gw = h // cfg.patch_size, w // cfg.patch_size
        cos, sin = rope_from_complex(image_rotary_emb, gh, gw)
        base = (cross_attention_kwargs or {}).get("base_sequence_length")
        gain = Tensor(np.array([rope.proportional_attention_gain(gh * gw, base)], np.float32))
        t = timestep.astype(ms.float32)
        if t.shape != (b,):
            t = t.broadcast_to((b,))
        v = self.model(hidden_states.astype(self.dtype), t, encoder_hidden_states.astype(self.dtype),
                       encoder_mask, cos, sin, gain)  # (B, C, H, W)  # fmt: skip
        out = mint.cat([v, v], dim=1)  # (B, 2C, H, W): the pipeline keeps the first C channels
        return SimpleNamespace(sample=out) if return_dict else (out,)


def rope_from_complex(table, grid_h: int, grid_w: int):
    """(cos, sin) float32 Tensors (grid_h * grid_w, D/2) from a complex (H_max, W_max, D/2) RoPE table, in the
    row-major token order diffusers flattens ``table[:grid_h, :grid_w]`` in."""
    arr = table.asnumpy() if isinstance(table, Tensor) else np.asarray(table)
    if arr.ndim != 3 or not np.iscomplexobj(arr):
        raise ValueError(f"image_rotary_emb must be a complex (H, W, D/2) table, got {arr.dtype} {arr.shape}")
    if arr.shape[0] < grid_h or arr.shape[1] < grid_w:
        raise ValueError(f"image_rotary_emb {arr.shape[:2]} is smaller than the {grid_h}x{grid_w} patch grid")
    part = arr[:grid_h, :grid_w].reshape(grid_h * grid_w, -1)
    return Tensor(np.ascontiguousarray(part.real, np.float32)), Tensor(np.ascontiguousarray(part.imag, np.float32))


def portable_rope_table(embed_dim, len_h, len_w, linear_factor=1.0, ntk_factor=1.0):
    """``get_2d_rotary_pos_embed_lumina`` computed by NumPy: complex64 (len_h, len_w, embed_dim/2), slot 2k at the
    row angle and slot 2k+1 at the column angle of ``rope.frequencies`` (float32 angles, as diffusers rounds them)."""
    freqs = rope.frequencies(embed_dim, linear_factor=linear_factor, ntk_factor=ntk_factor).astype(np.float32)
    rows = np.arange(len_h, dtype=np.float32)[:, None] * freqs  # (H, D/4)
    cols = np.arange(len_w, dtype=np.float32)[:, None] * freqs  # (W, D/4)
    angles = np.empty((len_h, len_w, embed_dim // 4, 2), np.float32)
    angles[..., 0] = rows[:, None, :]
    angles[..., 1] = cols[None, :, :]
    angles = angles.reshape(len_h, len_w, embed_dim // 2)
    return Tensor((np.cos(angles) + 1j * np.sin(angles)).astype(np.complex64))


class _PenultimateOnly(tuple):
    """``hidden_states`` of the adapted encoder: only ``[-2]`` (the layer Lumina reads) is computed."""

    def __getitem__(self, index):
        if index != -2:
            raise IndexError("the adapted Gemma encoder computes hidden_states[-2] only (the features Lumina uses)")
        return tuple.__getitem__(self, 0)


class GemmaAdapter:
    """A Gemma ``DecoderEncoder`` called as transformers' ``GemmaModel`` is by the Lumina pipeline."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.config = FrozenConfig(dataclasses.asdict(encoder.cfg))

    @property
    def dtype(self):
        return self.encoder.embed_tokens.weight.dtype

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=True, return_dict=True):
        if attention_mask is None:
            attention_mask = mint.ones_like(input_ids)
        feats = self.encoder(input_ids.astype(ms.int32), attention_mask.astype(ms.int32))  # (B, L, hidden)
        hidden = _PenultimateOnly((feats, None))
        return SimpleNamespace(hidden_states=hidden) if return_dict else (None, hidden)


class AutoencoderKLAdapter:
    """The project's ``AutoencoderKL`` with diffusers' ``decode(z, return_dict)`` / ``encode`` surface."""

    def __init__(self, vae: vae_lib.AutoencoderKL, tiling: vae_lib.Tiling | None = None):
        self.vae = vae
        self.tiling = tiling
        self.config = FrozenConfig(vae_config_json(vae.cfg))

    @property
    def dtype(self):
        return self.vae.dtype

    def decode(self, z, return_dict=True):
        image = self.vae.decode(z, self.tiling)  # (B, 3, H, W) in about [-1, 1]
        return SimpleNamespace(sample=image) if return_dict else (image,)

    def encode(self, x, return_dict=True):
        dist = self.vae.encode(x)
        return SimpleNamespace(latent_dist=dist) if return_dict else (dist,)


# ------------------------------------------------------------------------------------------------------------------
# A mindone pipeline from the project's components
# ------------------------------------------------------------------------------------------------------------------
def install_portable_rope() -> bool:
    """Put ``portable_rope_table`` in mindone's Lumina pipeline module where mindone's own cannot run (CPU).
    Returns whether it was installed."""
    if not backend.is_cpu():
        return False
    from mindone.diffusers.pipelines.lumina import pipeline_lumina

    pipeline_lumina.get_2d_rotary_pos_embed_lumina = portable_rope_table
    return True


def mindone_pipeline(pipe, scheduler=None):
    """A ``mindone.diffusers.LuminaPipeline`` running the components of a ``TextToImagePipeline`` (which must have a
    VAE: mindone's pipeline always decodes through one, with a fixed 8x factor); lazy components are loaded."""
    from mindone.diffusers import FlowMatchEulerDiscreteScheduler, LuminaPipeline

    if pipe.vae is None:
        raise ValueError("mindone's LuminaPipeline needs a VAE (8x); this pipeline works in pixel space")
    if pipe.vae.cfg.downsample_factor != 8:
        raise ValueError(f"mindone's LuminaPipeline assumes an 8x VAE, this one is {pipe.vae.cfg.downsample_factor}x")
    if not isinstance(pipe.text_encoder.cfg, GemmaConfig):
        raise ValueError("mindone's LuminaPipeline is Lumina-Next's: it needs the Gemma encoder, not LLaMA")
    pipe.load_all()
    install_portable_rope()
    return LuminaPipeline(
        transformer=NextDiTAdapter(pipe.transformer, pipe.train_size // 8),
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKLAdapter(pipe.vae, pipe.vae_tiling),
        text_encoder=GemmaAdapter(pipe.text_encoder),
        tokenizer=pipe.tokenizer,
    )
