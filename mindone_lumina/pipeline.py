"""Text-to-image: prompts -> text-encoder features -> flow ODE over the DiT -> VAE decode -> PIL images.

One pipeline runs both Lumina generations: Lumina-Next (Next-DiT + Gemma) and Lumina-T2I (Flag-DiT + LLaMA-2); the
family differences (prompt encoding, RoPE scaling) are chosen from the transformer's and the encoder's config.

Time convention and step counting are those of ``sampling.py``. The denoiser is compiled once per resolution: every
model call of every step and every ``__call__`` at that size reuses it (RoPE tables and timesteps are inputs). On CPU
graph mode that is one block graph the layers take turns in (``shared_block``), elsewhere one whole-model graph.
Context Drop (``models/context_drop.py``, Next-DiT only) adds a second graph per resolution, the merged one, which
the evaluations in its time window run (its pooling tables are inputs too).

Memory: a component may be ``Lazy`` (its config known, its weights read when needed). ``from_pretrained`` makes the
components lazy when ``offload`` is on: the text encoder is loaded for encoding and released, the transformer is
loaded after it and kept, the denoiser's compiled graphs are released after sampling (the next call compiles them
again), the VAE is loaded for decoding and released, so the peak is the largest stage rather than their sum.
Default: on CPU, for models whose weight files exceed ``OFFLOAD_ABOVE`` bytes (the full-size Lumina-Next fits a
24 GiB machine only this way; a small model stays resident and compiles its graphs once).
"""

import contextlib
import dataclasses
import gc
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Tensor

from . import backend, components, sampling
from .dtypes import ms_dtype
from .io import diffusers_io
from .models import context_drop, flagdit, lora, nextdit
from .models import vae as vae_lib
from .sampling import SampleSettings
from .text import gemma, llama
from .text.tokenizers import words
from .weights import lora as lora_files

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes-demo")
LATENT_CHANNELS_GUIDED = 3  # the original guides latent channels 0-2 only (see sampling.combine_guidance)
OFFLOAD_ABOVE = 4 << 30
log = logging.getLogger("mindone_lumina")


@dataclass
class PipelineOutput:
    images: list  # PIL images
    latents: np.ndarray  # (B, C, h, w) final latents in the denoiser's space, before decoding
    seconds: dict  # wall time of the stages: "text", "denoise", "decode"


@dataclass
class Lazy:
    """A component read from disk when needed: ``cfg`` is known up front, ``load()`` builds the Cell."""

    cfg: object
    load: object
    what: str


class TextToImagePipeline:
    """A DiT (``NextDiT`` / ``FlagDiT``), its prompt encoder and tokenizer, and a VAE (None: a pixel-space model,
    the denoiser's space is the image in [-1, 1]). Components may be ``Lazy`` (module docstring).

    Args:
        train_size: pixels per side of the training area (1024 for Lumina-Next); the default output size and the
            reference for RoPE extrapolation and proportional attention.
        vae_tiling: decode in tiles (``vae.Tiling``) to bound memory; default: tiles beyond 512x512 pixels.
        shared_block: run a Next-DiT through one compiled block graph (``nextdit.SharedBlockNextDiT``; same numbers,
            the graph memory of one block). Default: in CPU graph mode, where the whole-model graph's memory grows
            with depth; False: always the whole-model graph.
        defaults: the ``SampleSettings`` a call starts from; prompt_template: applied to every prompt ("{}": as is).
        vocabulary: the words of the training captions, for a small model that knows no others: a prompt with other
            words logs one warning naming them. None: any text (a model trained on open captions).
    """

    def __init__(self, transformer, text_encoder, tokenizer, vae=None, train_size: int = 1024, vae_tiling=None,
                 shared_block: bool | None = None, defaults: SampleSettings = SampleSettings(), prompt_template="{}",
                 dtype=None, vocabulary=None):  # fmt: skip
        if text_encoder.cfg.hidden_size != transformer.cfg.cap_feat_dim:
            raise ValueError(f"text encoder width {text_encoder.cfg.hidden_size} != transformer cap_feat_dim "
                             f"{transformer.cfg.cap_feat_dim}")  # fmt: skip
        if vae is not None and vae.cfg.latent_channels != transformer.cfg.in_channels:
            raise ValueError(f"VAE latent channels {vae.cfg.latent_channels} != {transformer.cfg.in_channels}")
        self.transformer, self.text_encoder, self.tokenizer, self.vae = transformer, text_encoder, tokenizer, vae
        self.train_size, self.vae_tiling, self.defaults, self.prompt_template = (
            train_size,
            vae_tiling,
            defaults,
            prompt_template,
        )
        self.vocabulary = None if vocabulary is None else frozenset(vocabulary)
        self.dtype = dtype or next(iter(transformer.get_parameters())).dtype
        self.shared_block, self._shared = shared_block, None
        self._before_lora = None  # (transformer, vocabulary) before the first load_lora
        self.offload = isinstance(text_encoder, Lazy)  # components loaded when used; graphs released after use
        self.layout = None  # the folder layout ``from_pretrained`` found

    @property
    def downsample(self) -> int:
        return 1 if self.vae is None else self.vae.cfg.downsample_factor

    @property
    def size_multiple(self) -> int:
        return self.downsample * self.transformer.cfg.patch_size  # 16 for Lumina-Next

    # --------------------------------------------------------------------------------------------------------------
    def __call__(self, prompt, negative_prompt="", seed: int = 0, latents=None, image=None, strength: float = 0.6,
                 grid=None, progress: bool = True, settings: SampleSettings | None = None, callback=None,
                 **overrides) -> PipelineOutput:  # fmt: skip
        """Generate one image per prompt.

        Args:
            prompt: a string or a list of strings.
            negative_prompt: the unconditional prompt ("" as the original), one string or one per prompt.
            seed: seeds the initial noise (NumPy PCG64), so the same seed gives the same image.
            latents: initial noise (B, C, h, w) instead of the seeded one (as diffusers' ``latents=``).
            image: img2img source (PIL images or a (B, 3, H, W) array in [-1, 1]) with ``strength`` in (0, 1].
            grid: an explicit increasing time grid from 0 to 1 instead of ``settings.schedule`` (e.g. ``1 - sigmas``
                of a diffusers scheduler).
            settings / overrides: ``SampleSettings`` fields (e.g. ``num_steps=10, solver="euler"``) over ``defaults``.
            callback: ``callback(i, t, x)`` after every solver step (as ``sampling.sample``).
        """
        settings = dataclasses.replace(settings or self.defaults, **overrides)
        settings.validate(self.size_multiple)
        self._context_drop_layers(settings)  # a layer or model it cannot serve: before any work
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height, width = settings.height or self.train_size, settings.width or self.train_size
        shape = (len(prompts), self.transformer.cfg.in_channels, height // self.downsample, width // self.downsample)
        noise = self._initial_noise(shape, seed, latents)
        if image is not None and not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")

        self._warn_about(prompts)
        start = time.perf_counter()
        cap_feats, cap_mask = self.encode_prompts([self.prompt_template.format(p) for p in prompts], negative_prompt)
        seconds = {"text": time.perf_counter() - start}

        if grid is None:
            grid = sampling.time_grid(settings.num_steps, settings.schedule, settings.shift, settings.steepness)
        x = Tensor(noise).astype(self.dtype)
        if image is not None:
            grid = sampling.truncate_grid(grid, strength)
            x = sampling.img2img_start(x, Tensor(self.encode_images(image)).astype(self.dtype), float(grid[0]))
        guided = None if settings.guide_all_channels else LATENT_CHANNELS_GUIDED
        velocity = sampling.cfg_velocity(self._model_fn(cap_feats, cap_mask, height, width, settings),
                                         settings.guidance_scale, guided)  # fmt: skip
        start = time.perf_counter()
        log.info("denoising %dx%d", width, height)
        bar = _progress(sampling.solver_steps(grid, settings.solver), progress)
        kwargs = {"atol": settings.atol, "rtol": settings.rtol} if settings.solver == "dopri5" else {}

        def on_step(i, t, x):
            bar.update(1)
            log.info("step %d t=%.4f", i + 1, t)
            if callback is not None:
                callback(i, t, x)

        final = sampling.sample(velocity, x, grid, settings.solver, callback=on_step, **kwargs)
        bar.close()
        final = final.astype(ms.float32).asnumpy()
        if self.offload:  # the denoiser's graph memory, before the VAE needs its own
            backend.release_compiled(self._shared.block if self._shared is not None else self.transformer)
        seconds["denoise"] = time.perf_counter() - start
        start = time.perf_counter()
        images = self.decode(final)
        seconds["decode"] = time.perf_counter() - start
        return PipelineOutput(images, final, seconds)

    def _warn_about(self, prompts) -> None:
        """One warning line per kind: empty prompts (the image follows no text), words outside ``vocabulary``."""
        empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
        if empty:
            log.warning("prompt %s is empty: the image follows no text (unconditional generation)",
                        ", ".join(f"#{i + 1}" for i in empty))  # fmt: skip
        if self.vocabulary is not None:
            unknown = sorted({w for p in prompts if isinstance(p, str) for w in words(p)} - self.vocabulary)
            if unknown:
                log.warning("this model never saw the word(s) %s in training and reads them as noise; it knows: %s",
                            ", ".join(repr(w) for w in unknown), " ".join(sorted(self.vocabulary)))  # fmt: skip

    # --------------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _use(self, name: str):
        """The Cell of component ``name``; a ``Lazy`` one is loaded for the block and released after it."""
        part = getattr(self, name)
        if not isinstance(part, Lazy):
            yield part
            return
        log.info("loading %s (%s)", name, part.what)
        cell = part.load()
        try:
            yield cell
        finally:
            del cell
            backend.release_compiled()
            gc.collect()
            log.info("released %s", name)

    def load_all(self) -> "TextToImagePipeline":
        """Load every ``Lazy`` component and keep it (for callers that hold the Cells, e.g. a mindone pipeline)."""
        for name in ("transformer", "text_encoder", "vae"):
            part = getattr(self, name)
            if isinstance(part, Lazy):
                setattr(self, name, part.load())
        return self

    def encode_prompts(self, prompts, negative_prompt=""):
        """(cap_feats in the pipeline dtype, cap_mask) of [prompts..., negatives...], the family's way."""
        family = llama if isinstance(self.text_encoder.cfg, llama.LlamaConfig) else gemma
        with self._use("text_encoder") as encoder:
            log.info("encoding %d prompts", len(prompts))
            cap_feats, cap_mask = family.encode_prompts(self.tokenizer, encoder, prompts, negative_prompt)
            del encoder  # the only reference left is the one ``_use`` drops
        return cap_feats.astype(self.dtype), cap_mask

    def _initial_noise(self, shape, seed: int, latents):
        if latents is None:
            return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        latents = np.asarray(latents.asnumpy() if isinstance(latents, Tensor) else latents, np.float32)
        if latents.shape != shape:
            raise ValueError(f"latents must have shape {shape} for these prompts and this size, got {latents.shape}")
        return latents

    def _model_fn(self, cap_feats, cap_mask, height: int, width: int, settings: SampleSettings):
        """``model_fn(x2, t) -> v2`` for ``sampling.cfg_velocity``; RoPE tables follow the time-aware switch at t, and
        Context Drop's pooling tables go to the evaluations in its time window (``SampleSettings.merges_at``)."""
        model = self.denoiser()
        h, w = height // self.downsample, width // self.downsample
        layers, merge = self._context_drop_layers(settings), ()
        if layers is not None:
            p = model.cfg.patch_size
            merge = (*context_drop.merge_inputs(h // p, w // p, settings.context_drop), layers)
        if isinstance(model.cfg, flagdit.FlagDiTConfig):  # Lumina-T2I's demo settings; the tables do not depend on t
            ntk = 1.0 if settings.scaling == "off" else flagdit.ntk_factor_for(height, width, self.train_size,
                                                                                self.size_multiple)  # fmt: skip
            base = flagdit.attention_base_seqlen(self.train_size, self.size_multiple)
            scaling = flagdit.RopeScaling(ntk_factor=ntk, base_seqlen=base if settings.proportional_attn else None)
            tables = flagdit.rope_inputs(model.cfg, h, w, scaling)

            def rope_at(t):
                return tables
        else:
            base = self._base_seqlen() if settings.proportional_attn else None
            if settings.scaling == "off":
                scaling = nextdit.RopeScaling(base_seqlen=base)
            else:
                kw = sampling.rope_scaling(height, width, settings.scale_watershed, settings.proportional_attn,
                                           settings.scaling, settings.smooth_rope, self.train_size)  # fmt: skip
                scaling = nextdit.RopeScaling(**{**kw, "base_seqlen": base})

            def rope_at(t):
                return nextdit.rope_inputs(model.cfg, h, w, t, scaling)

        def model_fn(x2, t: float):
            t_vec = Tensor(np.full((x2.shape[0],), t, np.float32))
            if settings.merges_at(t):
                return model(x2, t_vec, cap_feats, cap_mask, *rope_at(t), *merge)
            return model(x2, t_vec, cap_feats, cap_mask, *rope_at(t))

        return model_fn

    def _context_drop_layers(self, settings: SampleSettings) -> tuple | None:
        """The layers Context Drop runs in (None: off); ``ValueError`` for a model or a layer it cannot serve."""
        if settings.context_drop == 1:
            return None
        cfg = self.transformer.cfg  # also of a Lazy transformer, before it is loaded
        if not isinstance(cfg, nextdit.NextDiTConfig):
            raise ValueError(f"context_drop is implemented for Next-DiT only, not {cfg.FAMILY}: use context_drop 1")
        try:
            return sampling.context_drop_layers(settings.context_drop_layers, cfg.n_layers)
        except ValueError as e:
            raise ValueError(f"context_drop_layers: {e}") from None

    def denoiser(self):
        """The DiT, or the shared-block runner over a Next-DiT (see ``shared_block``), built once; a ``Lazy``
        transformer is loaded here and kept."""
        if isinstance(self.transformer, Lazy):
            log.info("loading transformer (%s)", self.transformer.what)
            self.transformer = self.transformer.load()
        auto = backend.is_cpu() and ms.get_context("mode") == ms.GRAPH_MODE
        use_shared = self.shared_block or (self.shared_block is None and auto)
        if not use_shared or not isinstance(self.transformer, nextdit.NextDiT):
            return self.transformer
        if self._shared is None:
            if not nextdit.SharedBlockNextDiT.supports(self.transformer):  # adapters differing by layer
                return self.transformer
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
            tiling = vae_lib.Tiling()  # an untiled 1024^2 SDXL decode peaks at 8.3 GB in CPU graph mode, tiled 2.4 GB
        with self._use("vae") as vae:
            log.info("decoding")
            images = vae_lib.latents_to_images(vae, latents, tiling)
            del vae
        return images

    def encode_images(self, image) -> np.ndarray:
        if self.vae is None:
            return vae_lib.images_to_array(image) if isinstance(image, list | tuple) else np.asarray(image, np.float32)
        with self._use("vae") as vae:
            latents = vae_lib.images_to_latents(vae, image)
            del vae
        return latents

    # --------------------------------------------------------------------------------------------------------------
    def load_lora(self, path: str, scale: float = 1.0, name: str | None = None) -> None:
        """Add a LoRA adapter (a peft folder: ``weights/lora.py``) to the transformer with ``scale`` times its own
        scaling; several adapters add up, each with its scale. Checked at once (names and shapes from the headers);
        a ``Lazy`` transformer gets it when it loads. The words the adapter was trained on join ``vocabulary``."""
        if self._before_lora is None:  # what unload_lora restores
            self._before_lora = (self.transformer, self.vocabulary)
        if isinstance(self.transformer, Lazy):
            part, previous = self.transformer, self.transformer.load

            def load():
                model = previous()
                lora_files.apply_adapter(model, path, scale, name)
                return model

            self.transformer = Lazy(part.cfg, load, part.what)
            plan_words = lora_files.plan_adapter(components.empty_transformer(part.cfg), path).vocabulary
        else:
            plan_words = lora_files.apply_adapter(self.transformer, path, scale, name).vocabulary
            self._shared = None  # the shared-block runner compiled the model without it
        if self.vocabulary is not None and plan_words:
            self.vocabulary = self.vocabulary | frozenset(plan_words)

    def unload_lora(self) -> None:
        """Remove every adapter: the transformer's weights are the base's, bit for bit (a ``Lazy`` one loads without
        them), and ``vocabulary`` is the base's again."""
        if self._before_lora is None:
            return
        transformer, self.vocabulary = self._before_lora
        if isinstance(self.transformer, Lazy):
            self.transformer = transformer
        else:
            lora.unload(self.transformer)
            self._shared = None
        self._before_lora = None

    @classmethod
    def from_pretrained(cls, source: str, dtype: str = "fp32", text_encoder: str | None = None, vae: str | None = None,
                        offload: bool | None = None):  # fmt: skip
        """A local pipeline folder (the diffusers layout, or the project's 0.1 layout), an original-format checkpoint
        (plus ``text_encoder`` and ``vae`` folders), or a Hugging Face hub id (downloaded when online). The
        transformer and text encoder are stored in ``dtype`` (fp32, fp16; bf16 on Ascend); the VAE stays fp32.
        ``offload``: see the module docstring (None: the default there)."""
        run_dtype = ms_dtype(dtype)
        backend.check_dtype_supported(run_dtype)
        if not os.path.exists(source):
            source = _download(source)
        folder = _pipeline_folder(source, text_encoder, vae)
        if folder is not None:
            log.info("reading %s", folder.describe())
        transformer_src = folder.part("transformer") if folder else source
        encoder_dir = text_encoder or folder.part("text_encoder")
        tokenizer_dir = folder.part("tokenizer") if folder and not text_encoder else encoder_dir
        vae_dir = vae or (folder.part("vae") if folder and folder.has_vae else None)
        family, cfg, specs = components.transformer_plan(transformer_src)
        encoder_cfg = components.text_encoder_config(encoder_dir)
        parts = [transformer_src, encoder_dir] + ([vae_dir] if vae_dir else [])
        if offload is None:
            offload = backend.is_cpu() and sum(map(components.weight_bytes, parts)) > OFFLOAD_ABOVE
        vae_cfg = vae_dir and diffusers_io.component_config(diffusers_io.vae_folder(vae_dir), diffusers_io.vae_config)
        lazy = {
            "transformer": Lazy(
                cfg, lambda: components.build_transformer(family, cfg, specs, run_dtype), transformer_src
            ),
            "text_encoder": Lazy(
                encoder_cfg, lambda: components.load_text_encoder(encoder_dir, run_dtype, encoder_cfg), encoder_dir
            ),  # fmt: skip
            "vae": vae_dir and Lazy(vae_cfg, lambda: components.load_vae(vae_dir), vae_dir),
        }
        parts = {k: v if v is None or offload else v.load() for k, v in lazy.items()}
        settings = folder.settings if folder else diffusers_io.ProjectSettings(1024)
        defaults = SampleSettings(**settings.sampling)
        pipe = cls(parts["transformer"], parts["text_encoder"], components.load_tokenizer(tokenizer_dir, encoder_cfg),
                   parts["vae"], settings.train_size, defaults=defaults, prompt_template=settings.prompt_template,
                   dtype=run_dtype, vocabulary=settings.vocabulary)  # fmt: skip
        pipe.layout = folder.layout if folder else "original checkpoint"
        return pipe

    def save_pretrained(self, folder: str) -> None:
        """Write this pipeline as a folder in the diffusers layout (``io.diffusers_io``) that diffusers, mindone and
        ``from_pretrained`` load, with its training size, sampling defaults and prompt template."""
        self.load_all()
        # the usual five, and every other setting whose default this pipeline changed (RoPE mode, Context Drop, ...)
        plain = SampleSettings()
        sampling_defaults = {k: v for k, v in dataclasses.asdict(self.defaults).items()
                             if k in diffusers_io.DEFAULT_SAMPLING or v != getattr(plain, k)}  # fmt: skip
        vocabulary = None if self.vocabulary is None else sorted(self.vocabulary)
        settings = diffusers_io.ProjectSettings(self.train_size, self.prompt_template, sampling_defaults, vocabulary)
        diffusers_io.save_pipeline(folder, settings, self.transformer, self.text_encoder, self.tokenizer, self.vae)


def size_factors(source: str, text_encoder: str | None = None, vae: str | None = None) -> tuple | None:
    """(patch size, VAE downsampling factor) of the pipeline ``from_pretrained`` builds from the same arguments:
    image sides must be multiples of their product (``size_multiple``). Read from config files and weight headers,
    before any weights are loaded; None for a hub id not downloaded yet."""
    if not os.path.exists(source):
        if _is_hub_id(source):
            return None
        raise ValueError(f"{source} does not exist (nor is it a Hugging Face hub id, org/name)")
    folder = _pipeline_folder(source, text_encoder, vae)
    patch = components.dit_config(folder.part("transformer") if folder else source).patch_size
    vae_dir = vae or (folder.part("vae") if folder and folder.has_vae else None)
    if vae_dir is None:
        return patch, 1
    vae_cfg = diffusers_io.component_config(diffusers_io.vae_folder(vae_dir), diffusers_io.vae_config)
    return patch, vae_cfg.downsample_factor


def _pipeline_folder(source: str, text_encoder: str | None, vae: str | None):
    """The ``PipelineFolder`` at ``source``, or None for an original checkpoint, which needs both other folders."""
    folder = diffusers_io.read_pipeline(source) if diffusers_io.is_pipeline(source) else None
    if folder is None and (text_encoder is None or vae is None):
        raise ValueError(
            f"{source} is not a pipeline folder (no model_index.json); for an original Lumina-T2X checkpoint also "
            "pass the text encoder folder (text_encoder=, --text-encoder: Gemma for Lumina-Next, LLaMA-2 for "
            "Lumina-T2I) and the SDXL-VAE folder (vae=, --vae)"
        )
    return folder


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def _download(repo_id: str) -> str:
    """Fetch a hub snapshot; offline, say exactly what to download where."""
    if not _is_hub_id(repo_id):
        raise ValueError(f"{repo_id} does not exist (nor is it a Hugging Face hub id, org/name)")
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
