"""Training an ``AutoencoderKL`` (the diffusers VAE layout of ``vae.py``) on images, for a latent space of one's own.

No pretrained VAE can be downloaded on an offline machine, and a Next-DiT on small images learns far faster on the
latents of even a small VAE than on pixels (README, model card). This trains one with the project's loop
(``loop.fit``: one compiled step, AdamW, clipping, EMA, exact resume, msrun data parallel) and exports a diffusers
``vae/`` folder that ``TrainConfig.vae``, the pipeline and diffusers itself load.

Loss, per image: the mean squared error of the reconstruction of a posterior sample ``z = mean + std * eps`` plus
``kl_weight`` times KL(q(z | x) || N(0, I)) summed over the latent and divided by the image's element count (so the
weight does not depend on the resolution); then the batch mean. No perceptual or adversarial term (diffusers'
SD VAEs had both): the images this is meant for are flat synthetic ones, and neither has a CPU-friendly form here.

The exported ``scaling_factor`` is 1 / std of the posterior means over (up to ``scaling_samples``) training images, so
the denoiser sees latents of unit variance, as the SD VAEs' factors were chosen.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Tensor, mint, nn

from .. import components
from ..io import diffusers_io
from ..models import vae as vae_lib
from ..models.layers import parameter_count
from ..weights.load import load_state_dict
from .data import batch_indices, bucket_groups, buckets, read_images
from .loop import fit
from .recipe import Recipe
from .sources import read_items
from .step import Trainer


# ------------------------------------------------------------------------------------------------------------------
# Recipe
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class VAETrainConfig(Recipe):
    """A VAE recipe (``tools/train_vae.py``): the optimiser and loop fields of ``Recipe`` plus the VAE."""

    vae: dict  # VAEConfig fields (diffusers names): block_out_channels, layers_per_block, latent_channels, ...
    kl_weight: float = 1e-4  # times KL summed over the latent per image element (module docstring)
    scaling_samples: int = 2048  # images encoded to fit the exported scaling_factor

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.vae, dict):
            raise ValueError(f"vae must be a mapping of AutoencoderKL settings, got {self.vae!r}")
        known = {f.name for f in dataclasses.fields(vae_lib.VAEConfig)} - {"sample_size", "scaling_factor"}
        unknown = sorted(set(self.vae) - known)
        if unknown:
            raise ValueError(f"unknown vae setting(s) {unknown}; expected a subset of {sorted(known)}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.scaling_samples < 1:
            raise ValueError(f"scaling_samples must be >= 1, got {self.scaling_samples}")
        f = self.vae_config.downsample_factor
        for h, w in buckets(self.resolution, self.aspect_ratios, self.bucket_multiple):
            if h % f or w % f:
                raise ValueError(f"bucket {h}x{w} is not divisible by the VAE's downsampling factor {f}")

    @property
    def vae_config(self) -> vae_lib.VAEConfig:
        """The architecture; ``scaling_factor`` is a placeholder until ``export_vae`` fits it."""
        return vae_lib.VAEConfig(**self.vae, sample_size=self.resolution, scaling_factor=1.0)


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Images:
    """Training images (3, H, W) float32 in [-1, 1], grouped by bucket shape."""

    images: list
    skipped: dict

    def __post_init__(self):
        self.groups = bucket_groups([x.shape for x in self.images])


def load_images(cfg: Recipe, log=print) -> Images:
    """Every readable image of ``cfg.data`` (any list ``sources.read_items`` reads) at its nearest bucket."""
    bucket_list = buckets(cfg.resolution, cfg.aspect_ratios, cfg.bucket_multiple)
    images, _, skipped = read_images(read_items(cfg.data), bucket_list, log)
    return Images(images, skipped)


def make_batch(ds: Images, cfg: VAETrainConfig, step: int, rank: int = 0, world: int = 1):
    """Host-side batch for ``step``: images (B, 3, H, W) and the posterior noise (B, latent, H/f, W/f), drawn for
    the whole global batch from (seed, step) and sliced by rank, as ``data.draws`` does."""
    idx = batch_indices(ds.groups, cfg, step, rank, world)
    x = np.stack([ds.images[i] for i in idx])
    vae_cfg = cfg.vae_config
    f = vae_cfg.downsample_factor
    shape = (cfg.batch_size * world, vae_cfg.latent_channels, x.shape[2] // f, x.shape[3] // f)
    eps = np.random.default_rng([cfg.seed, step, 2]).standard_normal(shape, dtype=np.float32)
    return x, eps[rank * cfg.batch_size : (rank + 1) * cfg.batch_size], idx


# ------------------------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------------------------
class VAELoss(nn.Cell):
    """Reconstruction MSE of a posterior sample plus the weighted KL term (module docstring); ``eps`` is the noise."""

    def __init__(self, model: vae_lib.AutoencoderKL, kl_weight: float):
        super().__init__()
        self.model = model
        self.kl_weight = kl_weight

    def construct(self, x, eps):
        vae = self.model
        moments = vae.encoder(x)  # (B, 2C, h, w)
        if vae.cfg.use_quant_conv:
            moments = vae.quant_conv(moments)
        mean, logvar = mint.chunk(moments, 2, dim=1)
        logvar = mint.clamp(logvar, -30.0, 20.0)  # as DiagonalGaussian (and diffusers) clamp it
        z = mean + mint.exp(0.5 * logvar) * eps
        if vae.cfg.use_post_quant_conv:
            z = vae.post_quant_conv(z)
        diff = vae.decoder(z).astype(ms.float32) - x  # (B, 3, H, W)
        mse = (diff * diff).mean()
        per_element = x.shape[1] * x.shape[2] * x.shape[3]
        kl = 0.5 * (mean * mean + mint.exp(logvar) - 1.0 - logvar).sum() / (x.shape[0] * per_element)
        return mse + self.kl_weight * kl


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------
def train_vae(cfg: VAETrainConfig, rank: int = 0, world: int = 1, log=print, stop_after=None, progress: bool = True):
    """Train (or resume) the VAE run in ``cfg.output``; returns the trainer (``trainer.data`` holds the images)."""
    ms.set_context(mode=ms.GRAPH_MODE if cfg.mode == "graph" else ms.PYNATIVE_MODE)
    ms.set_seed(cfg.seed)
    ds = load_images(cfg, log)
    model = vae_lib.AutoencoderKL(cfg.vae_config)
    if cfg.init:  # a diffusers vae/ folder of the same architecture
        components.load_vae(cfg.init, into=model)
    trainer = Trainer(VAELoss(model, cfg.kl_weight), cfg, world)

    def batches(first: int, last: int):
        for index in range(first, last):
            x, eps, idx = make_batch(ds, cfg, index, rank, world)
            yield (Tensor(x), Tensor(eps)), idx

    what = f"VAE {parameter_count(model):,} parameters, {len(ds.images)} images"
    trainer = fit(cfg, trainer, batches, what, rank, world, log, stop_after, progress)
    trainer.data = ds
    return trainer


def fitted_scaling_factor(vae: vae_lib.AutoencoderKL, images: list, samples: int, chunk: int = 64) -> float:
    """1 / std of the posterior means of up to ``samples`` of ``images`` (spread evenly over the list)."""
    pick = np.unique(np.linspace(0, len(images) - 1, min(samples, len(images))).round().astype(int))
    means = []
    for shape in sorted({images[i].shape for i in pick}):  # full chunks of one bucket shape per encoder call
        same = [i for i in pick if images[i].shape == shape]
        for start in range(0, len(same), chunk):
            x = np.stack([images[i] for i in same[start : start + chunk]])
            means.append(vae.encode(Tensor(x)).mean.astype(ms.float32).asnumpy().ravel())
    std = float(np.concatenate(means).std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"the posterior means have std {std}; the VAE did not train (diverged or collapsed)")
    return 1.0 / std


def export_vae(cfg: VAETrainConfig, trainer: Trainer, folder: str, use_ema: bool = True) -> float:
    """Write a diffusers ``vae/`` folder (EMA weights by default) with the fitted ``scaling_factor``; returns it.
    The folder appears whole or not at all (written under a temporary name and renamed)."""
    source = trainer.ema if use_ema else trainer.params
    state = {n: p.asnumpy() for n, p in zip(trainer.param_names, source)}
    vae = vae_lib.AutoencoderKL(cfg.vae_config)
    load_state_dict(vae, state, what="the trained VAE")
    factor = fitted_scaling_factor(vae, trainer.data.images, cfg.scaling_samples)
    final = vae_lib.AutoencoderKL(dataclasses.replace(cfg.vae_config, scaling_factor=factor))
    load_state_dict(final, state, what="the trained VAE")
    diffusers_io.save_component("vae", folder, final)
    return factor
