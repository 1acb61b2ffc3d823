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
``rope.frequencies``) in mindone's Lumina pipeline module when ``backend.use_fused_kernels()`` is false. On Ascend
mindone's own function is left in place.

``save_*`` write each component in the diffusers layout (``config.json`` + safetensors with diffusers parameter names)
and ``save_pipeline`` a whole pipeline with ``model_index.json``, which diffusers (PyTorch), mindone and
``LuminaNextPipeline.from_pretrained`` load. Every folder is written under a temporary name and renamed at the end.
"""

import dataclasses
import os
from types import SimpleNamespace

import numpy as np

import mindspore as ms
from mindspore import Tensor, mint

from . import backend, checkpoint_io, gemma, nextdit, rope
from . import vae as vae_lib
from .nextdit_weights import diffusers_config, layout_tensors

DIFFUSERS_VERSION = "0.35.2"  # the version whose loaders the saved folders are tested against
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


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
        self.config = FrozenConfig({**diffusers_config(model.cfg), "sample_size": sample_size})
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
    """A ``GemmaEncoder`` called as transformers' ``GemmaModel`` is by the Lumina pipeline."""

    def __init__(self, encoder: gemma.GemmaEncoder):
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
        self.config = FrozenConfig(_vae_config(vae.cfg))

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
    if backend.use_fused_kernels():
        return False
    from mindone.diffusers.pipelines.lumina import pipeline_lumina

    pipeline_lumina.get_2d_rotary_pos_embed_lumina = portable_rope_table
    return True


def mindone_pipeline(pipe, scheduler=None):
    """A ``mindone.diffusers.LuminaPipeline`` running the components of a ``LuminaNextPipeline`` (which must have a
    VAE: mindone's pipeline always decodes through one, with a fixed 8x factor)."""
    from mindone.diffusers import FlowMatchEulerDiscreteScheduler, LuminaPipeline

    if pipe.vae is None:
        raise ValueError("mindone's LuminaPipeline needs a VAE (8x); this pipeline works in pixel space")
    if pipe.vae.cfg.downsample_factor != 8:
        raise ValueError(f"mindone's LuminaPipeline assumes an 8x VAE, this one is {pipe.vae.cfg.downsample_factor}x")
    if not isinstance(pipe.text_encoder, gemma.GemmaEncoder):
        raise ValueError("mindone's LuminaPipeline is Lumina-Next's: it needs the Gemma encoder, not LLaMA")
    install_portable_rope()
    sample_size = pipe.train_size // 8
    return LuminaPipeline(
        transformer=NextDiTAdapter(pipe.transformer, sample_size),
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKLAdapter(pipe.vae, pipe.vae_tiling),
        text_encoder=GemmaAdapter(pipe.text_encoder),
        tokenizer=pipe.tokenizer,
    )


# ------------------------------------------------------------------------------------------------------------------
# Saving in the diffusers layout (loading: pipeline.load_transformer, gemma.load_gemma, vae.load_vae, or
# LuminaNextPipeline.from_pretrained for a whole folder)
# ------------------------------------------------------------------------------------------------------------------
def _vae_config(cfg: vae_lib.VAEConfig) -> dict:
    levels = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        **dataclasses.asdict(cfg),
        "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "act_fn": "silu",
    }


def _specs(named_params, names=None) -> list:
    out = []
    for i, p in enumerate(named_params):
        dtype = {ms.float32: "float32", ms.float16: "float16", ms.bfloat16: "bfloat16"}[p.dtype]
        name = p.name if names is None else names[i]
        out.append(checkpoint_io.TensorSpec(name, tuple(p.shape), dtype, lambda p=p: p.astype(ms.float32).asnumpy()))
    return out


def _write_transformer(model: nextdit.NextDiT, folder: str, sample_size: int):
    specs = layout_tensors(_specs(model.get_parameters()), "diffusers")
    checkpoint_io.write_safetensors(os.path.join(folder, WEIGHTS_NAME), specs, {"format": "pt"})
    conf = {**diffusers_config(model.cfg), "sample_size": sample_size, "_diffusers_version": DIFFUSERS_VERSION}
    checkpoint_io.write_json(os.path.join(folder, "config.json"), conf)


def _write_vae(vae: vae_lib.AutoencoderKL, folder: str):
    specs = _specs(vae.get_parameters())  # the project's VAE names are diffusers' (vae.DIFFUSERS_RULES)
    checkpoint_io.write_safetensors(os.path.join(folder, WEIGHTS_NAME), specs, {"format": "pt"})
    checkpoint_io.write_json(os.path.join(folder, "config.json"), _vae_config(vae.cfg))


def save_transformer(model: nextdit.NextDiT, folder: str, sample_size: int) -> None:
    """A diffusers ``transformer/`` folder that ``diffusers.LuminaNextDiT2DModel.from_pretrained`` loads;
    ``sample_size`` is the latent side of the training area (128 for 1024 px through the 8x VAE)."""
    with checkpoint_io.staged_folder(folder) as tmp:
        _write_transformer(model, tmp, sample_size)


def save_vae(vae: vae_lib.AutoencoderKL, folder: str) -> None:
    """A diffusers ``vae/`` folder that ``diffusers.AutoencoderKL.from_pretrained`` loads."""
    with checkpoint_io.staged_folder(folder) as tmp:
        _write_vae(vae, tmp)


def save_text_encoder(encoder: gemma.GemmaEncoder, tokenizer, folder: str) -> None:
    """A Hugging Face ``GemmaModel`` folder (config, safetensors, tokenizer files)."""
    state = {p.name: p.astype(ms.float32).asnumpy() for p in encoder.get_parameters()}
    gemma.save_gemma(folder, encoder.cfg, state, tokenizer)


def save_pipeline(pipe, folder: str) -> None:
    """A diffusers-layout pipeline folder: ``model_index.json`` (``LuminaPipeline``), ``transformer/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and ``vae/`` (none for a pixel-space model)."""
    if not isinstance(pipe.transformer, nextdit.NextDiT) or not isinstance(pipe.text_encoder, gemma.GemmaEncoder):
        raise ValueError("the diffusers layout holds Lumina-Next (Next-DiT + Gemma); Lumina-T2I has none")
    with checkpoint_io.staged_folder(folder) as tmp:
        factor = 1 if pipe.vae is None else pipe.vae.cfg.downsample_factor
        _write_transformer(pipe.transformer, os.path.join(tmp, "transformer"), pipe.train_size // factor)
        save_text_encoder(pipe.text_encoder, pipe.tokenizer, os.path.join(tmp, "text_encoder"))
        pipe.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        if pipe.vae is not None:
            _write_vae(pipe.vae, os.path.join(tmp, "vae"))
        os.makedirs(os.path.join(tmp, "scheduler"))
        scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                     "num_train_timesteps": 1000, "shift": 1.0}  # fmt: skip
        checkpoint_io.write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), scheduler)
        index = {
            "_class_name": "LuminaPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "transformer": ["diffusers", "LuminaNextDiT2DModel"],
            "text_encoder": ["transformers", "GemmaModel"],
            "tokenizer": ["transformers", "GemmaTokenizerFast"],
            "vae": [None, None] if pipe.vae is None else ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        }  # the training size is transformer/config.json's sample_size times the VAE factor
        checkpoint_io.write_json(os.path.join(tmp, "model_index.json"), index)


__all__ = [
    "AutoencoderKLAdapter",
    "GemmaAdapter",
    "NextDiTAdapter",
    "install_portable_rope",
    "mindone_pipeline",
    "portable_rope_table",
    "rope_from_complex",
    "save_pipeline",
    "save_text_encoder",
    "save_transformer",
    "save_vae",
]
