"""Text-to-image: prompts -> Gemma features -> flow ODE over Next-DiT -> SDXL-VAE decode -> PIL images.

Lumina-T2I (Flag-DiT + LLaMA-2, ``flagdit.py`` / ``llama.py``) runs through the same pipeline: both transformers
share the ``construct`` contract, and the few family differences (prompt encoding, RoPE scaling) are chosen here by
the type of the transformer and of the text encoder.

Time convention and step counting are those of ``sampling.py``. The denoiser is compiled once per resolution: every
model call of every step and every ``__call__`` at that size reuses it (RoPE tables and timesteps are inputs). On CPU
graph mode that is one block graph the layers take turns in (``shared_block``), elsewhere one whole-model graph.
"""

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Tensor

from . import backend, flagdit, flagdit_weights, gemma, llama, nextdit, nextdit_weights, sampling
from . import vae as vae_lib
from .layers import cast_parameters
from .loading import load_state_dict

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes-demo")
LATENT_CHANNELS_GUIDED = 3  # the original guides latent channels 0-2 only (see sampling.combine_guidance)


@dataclass(frozen=True)
class SampleSettings:
    """Everything ``__call__`` can vary. Defaults are the original demo's (midpoint, 30 steps, shift 4, cfg 4,
    time-aware scaled RoPE with watershed 0.3, proportional attention)."""

    height: int | None = None  # pixels; None = the model's training size
    width: int | None = None
    num_steps: int = 30  # grid points, as the original (29 midpoint steps); see sampling.py
    solver: str = "midpoint"
    schedule: str = "shift"
    shift: float = 4.0
    steepness: float = 6.0  # sigmoid schedule only
    guidance_scale: float = 4.0
    guide_all_channels: bool = False
    scaling: str = "original"  # "original": scale RoPE only beyond the training area; "always" (diffusers); "off"
    smooth_rope: bool = False  # the paper's smooth time-aware formula instead of the released hard switch
    scale_watershed: float = 0.3
    proportional_attn: bool = True
    atol: float = 1e-6  # dopri5 only
    rtol: float = 1e-3

    def validate(self, multiple: int):
        if self.height is not None and (self.height < multiple or self.height % multiple):
            raise ValueError(f"height must be a positive multiple of {multiple}, got {self.height}")
        if self.width is not None and (self.width < multiple or self.width % multiple):
            raise ValueError(f"width must be a positive multiple of {multiple}, got {self.width}")
        if self.num_steps < 2:
            raise ValueError(
                f"num_steps counts grid points as the original does and must be >= 2, got {self.num_steps}"
            )
        if self.solver not in sampling.SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; valid: {', '.join(sampling.SOLVERS)}")
        if self.schedule not in sampling.SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(sampling.SCHEDULES)}")
        if not self.guidance_scale >= 0:
            raise ValueError(f"guidance scale must be >= 0, got {self.guidance_scale}")
        if self.scaling not in ("original", "always", "off"):
            raise ValueError(f"unknown scaling {self.scaling!r}; valid: original, always, off")
        if not 0.0 <= self.scale_watershed <= 1.0:
            raise ValueError(f"scale_watershed must be in [0, 1], got {self.scale_watershed}")


@dataclass
class PipelineOutput:
    images: list  # PIL images
    latents: np.ndarray  # (B, C, h, w) final latents in the denoiser's space, before decoding
    seconds: dict  # wall time of the stages: "text", "denoise", "decode"


class LuminaNextPipeline:
    """Next-DiT + Gemma + VAE. ``vae=None`` means a pixel-space model (the denoiser's space is the image in [-1, 1]).

    Args:
        transformer: a ``nextdit.NextDiT`` with weights.
        text_encoder: a ``gemma.GemmaEncoder`` whose width equals the transformer's ``cap_feat_dim``.
        tokenizer: a Hugging Face Gemma tokenizer with right padding (``gemma.load_tokenizer``).
        vae: a ``vae.AutoencoderKL`` or None.
        train_size: pixels per side of the training area (1024 for Lumina-Next); the default output size and the
            reference for RoPE extrapolation and proportional attention.
        vae_tiling: decode in tiles (``vae.Tiling``) to bound memory; default: tiles beyond 512x512 pixels.
        shared_block: run a Next-DiT through one compiled block graph (``nextdit.SharedBlockNextDiT``; same numbers,
            the graph memory of one block). Default: in graph mode without the fused kernels (CPU), where the
            whole-model graph's memory grows with depth; False: always the whole-model graph.
    """

    def __init__(
        self,
        transformer,
        text_encoder,
        tokenizer,
        vae=None,
        train_size: int = 1024,
        vae_tiling=None,
        shared_block: bool | None = None,
    ):
        if text_encoder.cfg.hidden_size != transformer.cfg.cap_feat_dim:
            raise ValueError(
                f"text encoder width {text_encoder.cfg.hidden_size} != transformer cap_feat_dim "
                f"{transformer.cfg.cap_feat_dim}"
            )
        if vae is not None and vae.cfg.latent_channels != transformer.cfg.in_channels:
            raise ValueError(f"VAE latent channels {vae.cfg.latent_channels} != {transformer.cfg.in_channels}")
        self.transformer, self.text_encoder, self.tokenizer, self.vae = transformer, text_encoder, tokenizer, vae
        self.train_size = train_size
        self.vae_tiling = vae_tiling
        self.shared_block, self._shared = shared_block, None

    @property
    def downsample(self) -> int:
        return 1 if self.vae is None else self.vae.cfg.downsample_factor

    @property
    def size_multiple(self) -> int:
        return self.downsample * self.transformer.cfg.patch_size  # 16 for Lumina-Next

    # --------------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt,
        negative_prompt="",
        seed: int = 0,
        latents=None,
        image=None,
        strength: float = 0.6,
        grid=None,
        progress: bool = True,
        settings: SampleSettings | None = None,
        callback=None,
        **overrides,
    ) -> PipelineOutput:
        """Generate one image per prompt.

        Args:
            prompt: a string or a list of strings.
            negative_prompt: the unconditional prompt ("" as the original), one string or one per prompt.
            seed: seeds the initial noise (NumPy PCG64), so the same seed gives the same image.
            latents: initial noise (B, C, h, w) instead of the seeded one (as diffusers' ``latents=``).
            image: img2img source (PIL images or a (B, 3, H, W) array in [-1, 1]) with ``strength`` in (0, 1].
            grid: an explicit increasing time grid from 0 to 1 instead of ``settings.schedule`` (e.g. ``1 - sigmas``
                of a diffusers scheduler).
            settings / overrides: ``SampleSettings`` fields (e.g. ``num_steps=10, solver="euler"``).
            callback: ``callback(i, t, x)`` after every solver step (as ``sampling.sample``), e.g. to record the
                trajectory.
        """
        settings = dataclasses.replace(settings or SampleSettings(), **overrides)
        settings.validate(self.size_multiple)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height = settings.height or self.train_size
        width = settings.width or self.train_size
        cfg = self.transformer.cfg
        shape = (len(prompts), cfg.in_channels, height // self.downsample, width // self.downsample)
        noise = self._initial_noise(shape, seed, latents)
        if image is not None and not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")

        start = time.perf_counter()
        text = llama if isinstance(self.text_encoder, llama.LlamaEncoder) else gemma
        cap_feats, cap_mask = text.encode_prompts(self.tokenizer, self.text_encoder, prompts, negative_prompt)
        cap_feats = cap_feats.astype(self._dtype)
        seconds = {"text": time.perf_counter() - start}

        if grid is None:
            grid = sampling.time_grid(settings.num_steps, settings.schedule, settings.shift, settings.steepness)
        x = Tensor(noise).astype(self._dtype)
        if image is not None:
            grid = sampling.truncate_grid(grid, strength)
            x1 = self.encode_images(image)
            x = sampling.img2img_start(x, Tensor(x1).astype(self._dtype), float(grid[0]))

        velocity = sampling.cfg_velocity(
            self._model_fn(cap_feats, cap_mask, height, width, settings),
            settings.guidance_scale,
            None if settings.guide_all_channels else LATENT_CHANNELS_GUIDED,
        )
        start = time.perf_counter()
        bar = _progress(sampling.solver_steps(grid, settings.solver), progress)
        kwargs = {"atol": settings.atol, "rtol": settings.rtol} if settings.solver == "dopri5" else {}

        def on_step(i, t, x):
            bar.update(1)
            if callback is not None:
                callback(i, t, x)

        x = sampling.sample(velocity, x, grid, settings.solver, callback=on_step, **kwargs)
        bar.close()
        final = x.astype(ms.float32).asnumpy()
        seconds["denoise"] = time.perf_counter() - start
        start = time.perf_counter()
        images = self.decode(final)
        seconds["decode"] = time.perf_counter() - start
        return PipelineOutput(images, final, seconds)

    # --------------------------------------------------------------------------------------------------------------
    @property
    def _dtype(self):
        return self.transformer.x_embedder.weight.dtype

    def _initial_noise(self, shape, seed: int, latents):
        if latents is None:
            return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        latents = np.asarray(latents.asnumpy() if isinstance(latents, Tensor) else latents, np.float32)
        if latents.shape != shape:
            raise ValueError(f"latents must have shape {shape} for these prompts and this size, got {latents.shape}")
        return latents

    def _model_fn(self, cap_feats, cap_mask, height: int, width: int, settings: SampleSettings):
        """``model_fn(x2, t) -> v2`` for ``sampling.cfg_velocity``; RoPE tables follow the time-aware switch at t."""
        if isinstance(self.transformer, flagdit.FlagDiT):
            return self._flagdit_model_fn(cap_feats, cap_mask, height, width, settings)
        cfg, model = self.transformer.cfg, self.denoiser()
        h, w = height // self.downsample, width // self.downsample
        if settings.scaling == "off":
            scaling = nextdit.RopeScaling(base_seqlen=self._base_seqlen() if settings.proportional_attn else None)
        else:
            kw = sampling.rope_scaling(
                height, width, settings.scale_watershed, settings.proportional_attn, settings.scaling,
                settings.smooth_rope, self.train_size,
            )  # fmt: skip
            kw["base_seqlen"] = self._base_seqlen() if settings.proportional_attn else None
            scaling = nextdit.RopeScaling(**kw)

        def model_fn(x2, t: float):
            cos, sin, gain = nextdit.rope_inputs(cfg, h, w, t, scaling)
            t_vec = Tensor(np.full((x2.shape[0],), t, np.float32))
            return model(x2, t_vec, cap_feats, cap_mask, cos, sin, gain)

        return model_fn

    def _flagdit_model_fn(self, cap_feats, cap_mask, height: int, width: int, settings: SampleSettings):
        """Lumina-T2I's demo settings: ``ntk_factor`` = area ratio to the training size (``scaling`` "off": 1) and
        the proportional-attention base (1024/16)^2 + (1024/16) * 2; the tables do not depend on t."""
        model, multiple = self.transformer, self.size_multiple
        ntk = 1.0 if settings.scaling == "off" else flagdit.ntk_factor_for(height, width, self.train_size, multiple)
        base = flagdit.attention_base_seqlen(self.train_size, multiple) if settings.proportional_attn else None
        scaling = flagdit.RopeScaling(ntk_factor=ntk, base_seqlen=base)
        cos, sin, gain = flagdit.rope_inputs(model.cfg, height // self.downsample, width // self.downsample, scaling)

        def model_fn(x2, t: float):
            return model(x2, Tensor(np.full((x2.shape[0],), t, np.float32)), cap_feats, cap_mask, cos, sin, gain)

        return model_fn

    def denoiser(self):
        """The Next-DiT, or the shared-block runner over it (see ``shared_block``), built once."""
        auto = not backend.use_fused_kernels() and ms.get_context("mode") == ms.GRAPH_MODE
        if not (self.shared_block or (self.shared_block is None and auto)):
            return self.transformer
        if self._shared is None:
            self._shared = nextdit.SharedBlockNextDiT(self.transformer)
        return self._shared

    def _base_seqlen(self) -> int:
        """Image tokens at the training area: (1024 / 16)^2 = 4096 for Lumina-Next."""
        return (self.train_size // self.size_multiple) ** 2

    def decode(self, latents: np.ndarray) -> list:
        if self.vae is None:
            from PIL import Image

            if not np.isfinite(latents).all():
                raise ValueError("the sampled image contains non-finite values; the denoiser diverged")
            return [Image.fromarray(a) for a in vae_lib.to_uint8(latents)]
        tiling = self.vae_tiling
        if tiling is None and latents.shape[2] * latents.shape[3] > 64 * 64:
            tiling = vae_lib.Tiling()  # beyond 512^2 an untiled SDXL decode needs > 20 GB in CPU graph mode
        return vae_lib.latents_to_images(self.vae, latents, tiling)

    def encode_images(self, image) -> np.ndarray:
        if self.vae is None:
            return vae_lib.images_to_array(image) if isinstance(image, list | tuple) else np.asarray(image, np.float32)
        return vae_lib.images_to_latents(self.vae, image)

    # --------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source: str, dtype: str = "fp32", text_encoder: str | None = None, vae: str | None = None):
        """A local diffusers-layout folder, an original-format checkpoint (plus ``text_encoder`` and ``vae``
        folders), or a Hugging Face hub id (downloaded when online)."""
        ms_dtype = backend.dtype_from_name(dtype)
        backend.check_dtype_supported(ms_dtype)
        if not os.path.exists(source):
            source = _download(source)
        if os.path.isfile(os.path.join(source, "model_index.json")):
            return cls._from_folder(source, ms_dtype, text_encoder, vae)
        return cls._from_original(source, ms_dtype, text_encoder, vae)

    @classmethod
    def _from_folder(cls, folder, dtype, text_encoder=None, vae=None):
        index = _read_json(os.path.join(folder, "model_index.json"))
        for part in ("transformer", "text_encoder", "tokenizer"):
            if not os.path.isdir(os.path.join(folder, part)) and not (part != "transformer" and text_encoder):
                raise ValueError(f"{folder} is missing the {part}/ component (model_index.json lists {sorted(index)})")
        has_vae = index.get("vae") not in (None, [None, None]) or vae is not None
        if has_vae and vae is None and not os.path.isdir(os.path.join(folder, "vae")):
            raise ValueError(f"{folder} is missing the vae/ component")
        transformer = load_transformer(os.path.join(folder, "transformer"), dtype)
        enc_dir = text_encoder or os.path.join(folder, "text_encoder")
        tok_dir = text_encoder if text_encoder and not os.path.isdir(os.path.join(folder, "tokenizer")) else None
        encoder = gemma.load_gemma(enc_dir, dtype)
        tokenizer = gemma.load_tokenizer(tok_dir or os.path.join(folder, "tokenizer"))
        decoder = vae_lib.load_vae(vae or os.path.join(folder, "vae")) if has_vae else None  # the VAE stays fp32
        factor = 1 if decoder is None else decoder.cfg.downsample_factor
        train_size = index.get("train_size", transformer.cfg.patch_size * _sample_size(folder) * factor)
        return cls(transformer, encoder, tokenizer, decoder, train_size=train_size)

    @classmethod
    def _from_original(cls, source, dtype, text_encoder, vae):
        if text_encoder is None or vae is None:
            raise ValueError(
                f"{source} is not a diffusers-layout folder (no model_index.json); for an original Lumina-T2X "
                "checkpoint also pass the text encoder folder (text_encoder=, --text-encoder: Gemma for Lumina-Next, "
                "LLaMA-2 for Lumina-T2I) and the SDXL-VAE folder (vae=, --vae)"
            )
        transformer = load_transformer(source, dtype)
        if isinstance(transformer, flagdit.FlagDiT):
            encoder, tokenizer = llama.load_llama(text_encoder, dtype), llama.load_tokenizer(text_encoder)
        else:
            encoder, tokenizer = gemma.load_gemma(text_encoder, dtype), gemma.load_tokenizer(text_encoder)
        return cls(transformer, encoder, tokenizer, vae_lib.load_vae(vae))


def _sample_size(folder: str) -> int:
    """diffusers ``sample_size`` (latent side at the training size) / patch size."""
    cfg = _read_json(os.path.join(folder, "transformer", "config.json"))
    return int(cfg.get("sample_size", 128)) // int(cfg.get("patch_size", 2))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _download(repo_id: str) -> str:
    """Fetch a hub snapshot; offline, say exactly what to download where."""
    if repo_id.count("/") != 1:
        raise ValueError(f"{repo_id} is neither a local path nor a Hugging Face hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id)
    except Exception as e:  # any hub failure: offline, unknown repo, gated model
        raise ValueError(
            f"cannot download {repo_id} ({type(e).__name__}: {e}). Without network, download it elsewhere with "
            f"`huggingface-cli download {repo_id} --local-dir DIR`, copy DIR here and pass DIR instead"
        ) from e


def _progress(total, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc="sampling", unit="step")


def load_transformer(path: str, dtype=ms.float32, arch=None):
    """A Next-DiT from a diffusers ``transformer/`` folder or an original checkpoint (any layout the converter reads),
    or a Flag-DiT from a Lumina-T2I checkpoint (told apart by its ``eol_token``); the architecture is the one recorded
    with the weights unless ``arch`` names one."""
    if flagdit_weights.is_flagdit(path):
        return flagdit_weights.load_flagdit(path, dtype, arch)
    cfg = nextdit_weights.resolve(path, arch)
    model = nextdit.NextDiT(cfg)
    load_state_dict(model, nextdit_weights.load_nextdit_state(path, cfg), what=path)
    return cast_parameters(model, dtype)
