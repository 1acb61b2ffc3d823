"""Flow-matching training of Next-DiT: recipe, data with cached features, the compiled train step, checkpoints.

Loss (time convention in ``sampling.py``): with data x1, noise x0 and t ~ U(0, 1) (or logit-normal),
``x_t = t x1 + (1 - t) x0`` and the model is regressed onto the velocity ``x1 - x0`` (mean squared error), as
Lumina-T2X ``lumina_next_t2i_mini/train.py`` / ``transport.py``.

Everything random (shuffling, caption dropout, t, noise) is drawn on the host from ``(seed, step, rank)``, so a resumed
run continues bit for bit. The forward, backward, gradient clipping and optimizer update are one compiled graph.
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import yaml
from safetensors.numpy import load_file, save_file

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from . import backend, checkpoint_io, gemma, nextdit
from . import vae as vae_lib
from .layers import parameter_count
from .loading import compare_shapes, load_state_dict

# ------------------------------------------------------------------------------------------------------------------
# Recipe
# ------------------------------------------------------------------------------------------------------------------
PRECISIONS = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """What every training recipe has: images, the optimiser, the loop. ``configs/*.yaml`` map onto the fields of a
    subclass one to one (unknown keys are an error)."""

    data: str  # folder with images and captions.jsonl ({"image": relpath, "caption": str} per line)
    output: str  # run folder: checkpoints/, cache/, exports
    resolution: int = 1024  # pixels per side of the target area; buckets keep about resolution^2 pixels
    aspect_ratios: tuple = (1.0,)  # width / height of the buckets
    bucket_multiple: int = 16
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    seed: int = 0
    save_every: int = 500
    log_every: int = 50
    mode: str = "graph"
    precision: str = "fp32"  # compute dtype: fp32, fp16 (CPU and Ascend) or bf16 (Ascend); weights stay fp32
    loss_scale: float = 4096.0  # initial dynamic loss scale for fp16 (halved on overflow, doubled after 1000 steps)
    zero_stage: int = 0  # 1: AdamW state sharded across the data-parallel ranks (mindone ZeRO stage 1)

    def __post_init__(self):
        object.__setattr__(self, "aspect_ratios", tuple(self.aspect_ratios))
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.mode not in ("graph", "pynative"):
            raise ValueError(f"mode must be graph or pynative, got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.precision != "fp32" and self.mode != "graph":
            # measured: MindSpore 2.10 PyNative with Cell.to_float(fp16) returns NaN for Next-DiT on CPU
            raise ValueError(f"precision {self.precision} needs mode graph (mixed precision is cast by the compiler)")
        if self.zero_stage not in (0, 1):
            # stages 2-3 shard gradients with ReduceScatter, which MindSpore 2.10 lacks on CPU: they could not be tested
            raise ValueError(f"zero_stage must be 0 or 1 (stages 2 and 3 are not implemented), got {self.zero_stage}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("batch_size", "grad_accum", "steps", "save_every", "log_every", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_yaml(cls, path: str, **overrides):
        """The recipe in the YAML file ``path``; ``overrides`` that are not None replace its keys."""
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read recipe {path}: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a recipe is a mapping of keys to values, got {type(raw).__name__}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        fields = dataclasses.fields(cls)
        unknown = sorted(set(raw) - {f.name for f in fields})
        if unknown:
            raise ValueError(f"{path}: unknown recipe key(s) {unknown}; known keys: {sorted(f.name for f in fields)}")
        missing = [f.name for f in fields if f.name not in raw and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{path}: the recipe needs key(s) {missing}")
        return cls(**raw)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Recipe):
    """A Next-DiT flow-matching recipe (``tools/train.py``)."""

    model: dict | str = "nextdit-2b-gqa"  # a Next-DiT preset or constructor arguments
    text_encoder: str = ""  # Hugging Face Gemma folder (config, safetensors, tokenizer files)
    vae: str | None = None  # diffusers vae/ folder; None trains in pixel space (images in [-1, 1])
    caption_dropout: float = 0.1  # to the empty prompt, for classifier-free guidance
    max_caption_tokens: int = 256
    t_sampling: str = "uniform"  # or "logit_normal"
    recompute: bool = False
    init: str | None = None  # a Next-DiT checkpoint in any format the converter reads

    def __post_init__(self):
        super().__post_init__()
        if self.t_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"t_sampling must be uniform or logit_normal, got {self.t_sampling!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


def lr_at(cfg: Recipe, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to 0 at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------------------------
# Data: buckets, images, cached latents and caption features
# ------------------------------------------------------------------------------------------------------------------
def buckets(resolution: int, aspect_ratios, multiple: int) -> list:
    """(height, width) pairs of about ``resolution^2`` pixels, sides multiples of ``multiple``."""
    out = []
    for ar in aspect_ratios:
        h = max(multiple, round(resolution / math.sqrt(ar) / multiple) * multiple)
        w = max(multiple, round(resolution * math.sqrt(ar) / multiple) * multiple)
        out.append((h, w))
    return sorted(set(out))


def read_captions(folder: str) -> list:
    path = os.path.join(folder, "captions.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no captions.jsonl (one {{'image': ..., 'caption': ...}} per line)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not JSON ({e})") from e
            if not isinstance(row.get("image"), str) or not isinstance(row.get("caption"), str):
                raise ValueError(f"{path} line {n}: needs string fields 'image' and 'caption'")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} lists no images")
    return rows


UNREADABLE, TOO_SMALL = "unreadable", "smaller than the smallest bucket"  # why an image is skipped


def load_image(path: str, bucket_list: list):
    """The image resized and centre-cropped to the bucket nearest its aspect ratio, as (3, H, W) in [-1, 1], or
    the reason it is skipped (``UNREADABLE``, ``TOO_SMALL``: fewer pixels than the smallest bucket)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError):
        return UNREADABLE
    w, h = im.size
    if h * w < min(bh * bw for bh, bw in bucket_list):
        return TOO_SMALL
    bh, bw = min(bucket_list, key=lambda b: abs(math.log((w / h) / (b[1] / b[0]))))
    scale = max(bh / h, bw / w)
    im = im.resize((max(bw, round(w * scale)), max(bh, round(h * scale))), Image.BICUBIC)
    left, top = (im.width - bw) // 2, (im.height - bh) // 2
    arr = np.asarray(im.crop((left, top, left + bw, top + bh)), np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)) / 127.5 - 1.0


def _file_digest(folder: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith((".safetensors", ".json")):
                with open(os.path.join(root, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


@dataclass
class Dataset:
    """Cached training samples: ``latents[i]`` (C, h, w) grouped by bucket, caption features per sample."""

    latents: list  # float32 arrays
    cap_feats: np.ndarray  # (N, Lc, D) float32, padded to one length
    cap_mask: np.ndarray  # (N, Lc) int32
    empty_feats: np.ndarray  # (Lc, D) features of "" (caption dropout)
    empty_mask: np.ndarray  # (Lc,)
    skipped: dict = field(default_factory=dict)  # reason -> count

    def __post_init__(self):
        self.groups = bucket_groups([z.shape for z in self.latents])  # once: batch_indices runs every step


def read_images(data: str, rows: list, bucket_list: list, log=print) -> tuple:
    """The readable images of ``rows`` (captions.jsonl entries) at their nearest bucket: (images, their rows, counts
    of skipped ones by reason). None readable raises ``ValueError``."""
    images, kept, skipped = [], [], {}
    for row in rows:
        img = load_image(os.path.join(data, row["image"]), bucket_list)
        if isinstance(img, str):
            skipped[img] = skipped.get(img, 0) + 1
            continue
        images.append(img)
        kept.append(row)
    if not images:
        raise ValueError(f"{data}: none of the {len(rows)} images could be read at buckets {bucket_list}")
    if skipped:
        log(f"skipped images: {skipped}")
    return images, kept, skipped


def prepare_data(cfg: TrainConfig, tokenizer, encoder, vae=None, log=print) -> Dataset:
    """Read images and captions once and cache their latents and Gemma features under ``output/cache``.

    The cache key holds the encoder and VAE weights, the buckets and each caption/image, so a changed model or
    resolution is recomputed rather than silently reused.
    """
    cache_dir = os.path.join(cfg.output, "cache")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=cache_dir, delete=True)
        probe.close()
    except OSError as e:
        raise ValueError(f"cache directory {cache_dir} cannot be written: {e}") from e
    bucket_list = buckets(cfg.resolution, cfg.aspect_ratios, cfg.bucket_multiple)
    rows = read_captions(cfg.data)
    key = hashlib.sha256(
        json.dumps(
            {
                "encoder": _file_digest(cfg.text_encoder),
                "vae": None if cfg.vae is None else _file_digest(cfg.vae),
                "buckets": bucket_list,
                "tokens": cfg.max_caption_tokens,
                "rows": rows,
            }
        ).encode()
    ).hexdigest()[:20]
    path = os.path.join(cache_dir, f"features-{key}.safetensors")
    if os.path.isfile(path):
        log(f"reusing cached latents and caption features {path}")
        return _dataset_from_arrays(load_file(path))

    images, kept, skipped = read_images(cfg.data, rows, bucket_list, log)
    captions = [row["caption"] for row in kept]
    arrays = {f"latent.{i}": z for i, z in enumerate(_latents(images, vae))}
    feats, mask = _encode_unique(tokenizer, encoder, captions + [""], cfg.max_caption_tokens)
    arrays.update(cap_feats=feats[:-1], cap_mask=mask[:-1], empty_feats=feats[-1], empty_mask=mask[-1])
    arrays["skipped"] = np.array([skipped.get(UNREADABLE, 0), skipped.get(TOO_SMALL, 0)], np.int64)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".features-")  # ranks sharing the folder each write their own
    os.close(fd)
    save_file(arrays, tmp)
    os.replace(tmp, path)
    log(f"cached {len(images)} samples in {path}")
    return _dataset_from_arrays(arrays, skipped)


def _latents(images: list, vae, chunk: int = 64) -> list:
    """Images (3, H, W) -> float32 latents, encoded ``chunk`` images of one bucket shape per VAE call (pixels as they
    are without a VAE)."""
    if vae is None:
        return [np.ascontiguousarray(img, np.float32) for img in images]
    out = [None] * len(images)
    for shape in sorted({img.shape for img in images}):
        index = [i for i, img in enumerate(images) if img.shape == shape]
        for start in range(0, len(index), chunk):
            part = index[start : start + chunk]
            z = vae_lib.images_to_latents(vae, np.stack([images[i] for i in part]))
            for i, zi in zip(part, z):
                out[i] = np.ascontiguousarray(zi, np.float32)  # safetensors writes the raw buffer
    return out


def _encode_unique(tokenizer, encoder, captions: list, max_tokens: int):
    """Gemma features of each distinct caption once, padded to one length (a multiple of 8) for one graph shape."""
    unique = sorted(set(captions))
    feats, masks = {}, {}
    for start in range(0, len(unique), 64):
        chunk = unique[start : start + 64]
        f, m = gemma.encode_prompts(tokenizer, encoder, chunk, negative_prompt=None, max_length=max_tokens)
        for text, fi, mi in zip(chunk, f.astype(ms.float32).asnumpy(), m.asnumpy()):
            feats[text], masks[text] = fi, mi
    length = max(int(m.sum()) for m in masks.values())
    length = min(max_tokens, (length + 7) // 8 * 8)
    out_f = np.zeros((len(captions), length, encoder.cfg.hidden_size), np.float32)
    out_m = np.zeros((len(captions), length), np.int32)
    for i, text in enumerate(captions):
        n = min(length, feats[text].shape[0])
        out_f[i, :n], out_m[i, :n] = feats[text][:n], masks[text][:n]
    return out_f, out_m


def _dataset_from_arrays(arrays: dict, skipped=None) -> Dataset:
    n = sum(1 for k in arrays if k.startswith("latent."))
    return Dataset(
        [arrays[f"latent.{i}"] for i in range(n)],
        arrays["cap_feats"],
        arrays["cap_mask"],
        arrays["empty_feats"],
        arrays["empty_mask"],
        skipped or {k: int(n) for k, n in zip((UNREADABLE, TOO_SMALL), arrays["skipped"]) if n},
    )


def bucket_groups(shapes: list) -> list:
    """Sample indices per distinct shape in ``shapes`` (one array per bucket, in sorted shape order)."""
    return [np.array([i for i, s in enumerate(shapes) if s == u]) for u in sorted(set(shapes))]


def batch_indices(ds, cfg: Recipe, step: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """The sample indices of global ``step`` for ``rank``: a per-epoch permutation from (seed, epoch) within each
    bucket (``ds.groups``, from ``bucket_groups``), the global batch split into ``world`` disjoint shards."""
    groups = ds.groups
    global_batch = cfg.batch_size * world
    per_epoch = [len(g) // global_batch for g in groups]
    if sum(per_epoch) == 0:
        total = sum(len(g) for g in groups)
        raise ValueError(f"{total} samples cannot fill one global batch of {global_batch} in any bucket")
    epoch, k = divmod(step, sum(per_epoch))
    rng = np.random.default_rng([cfg.seed, epoch])
    order = [(gi, b) for gi, nb in enumerate(per_epoch) for b in range(nb)]
    gi, b = order[rng.permutation(len(order))[k]]
    perm = groups[gi][rng.permutation(len(groups[gi]))]
    chunk = perm[b * global_batch : (b + 1) * global_batch]
    return chunk[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]


def make_batch(ds: Dataset, cfg: TrainConfig, step: int, rank: int = 0, world: int = 1):
    """Host-side batch for ``step``: x1, noise x0, t, caption features (with dropout) and mask.

    Noise, t and dropout are drawn for the whole global batch from (seed, step) and then sliced by rank, so the
    ranks of a data-parallel run together see exactly what one process with the global batch sees.
    """
    idx = batch_indices(ds, cfg, step, rank, world)
    rng = np.random.default_rng([cfg.seed, step, 1])
    shape = ds.latents[idx[0]].shape
    n = cfg.batch_size * world
    x0 = rng.standard_normal((n, *shape)).astype(np.float32)
    u = rng.standard_normal(n) if cfg.t_sampling == "logit_normal" else rng.uniform(0.0, 1.0, n)
    t = 1.0 / (1.0 + np.exp(-u)) if cfg.t_sampling == "logit_normal" else u
    drop = rng.uniform(0.0, 1.0, n) < cfg.caption_dropout
    mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    x0, t, drop = x0[mine], t[mine], drop[mine]
    x1 = np.stack([ds.latents[i] for i in idx])
    feats, mask = ds.cap_feats[idx].copy(), ds.cap_mask[idx].copy()
    feats[drop], mask[drop] = ds.empty_feats, ds.empty_mask
    return x1, x0, t.astype(np.float32), feats, mask, idx


# ------------------------------------------------------------------------------------------------------------------
# The compiled step
# ------------------------------------------------------------------------------------------------------------------
class FlowMatchingLoss(nn.Cell):
    """Velocity MSE on ``x_t = t x1 + (1 - t) x0`` (per-sample mean, then batch mean)."""

    def __init__(self, model: nextdit.NextDiT):
        super().__init__()
        self.model = model

    def construct(self, x1, x0, t, cap_feats, cap_mask, cos, sin, gain):
        tt = t.reshape(-1, 1, 1, 1)
        xt = tt * x1 + (1.0 - tt) * x0
        v = self.model(xt, t, cap_feats, cap_mask, cos, sin, gain)
        diff = v.astype(ms.float32) - (x1 - x0)  # the loss in fp32 whatever the compute dtype
        return (diff * diff).mean()


_ema_update = ops.MultitypeFuncGraph("ema_update")


@_ema_update.register("Tensor", "Tensor", "Tensor")
def _ema_one(decay, ema, param):
    return ops.assign(ema, ema * decay + param * (1.0 - decay))


_accumulate = ops.MultitypeFuncGraph("accumulate")


@_accumulate.register("Tensor", "Tensor")
def _accumulate_one(acc, grad):
    return ops.assign_add(acc, grad)


_zero = ops.MultitypeFuncGraph("zero")


@_zero.register("Tensor")
def _zero_one(acc):
    return ops.assign(acc, ops.zeros_like(acc))


_add = ops.MultitypeFuncGraph("add")


@_add.register("Tensor", "Tensor")
def _add_one(acc, grad):
    return acc + grad


_shard = ops.MultitypeFuncGraph("shard")


@_shard.register("Function", "Int", "Tensor", "Bool")
def _shard_one(split, rank, grad, sharded):
    return split(grad)[rank] if sharded else grad


_scale = ops.MultitypeFuncGraph("scale")


@_scale.register("Number", "Tensor")
def _scale_one(factor, grad):
    return grad * factor


@_scale.register("Tensor", "Tensor")
def _scale_by_tensor(factor, grad):
    return grad * factor.astype(grad.dtype)


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults


class AdamWBiasCorrection(nn.learning_rate_schedule.LearningRateSchedule):
    """``value * sqrt(1 - beta2^t) / (1 - beta1^t)`` at optimizer step ``t = global_step + 1`` (``inverse``: divided).

    ``nn.AdamWeightDecay`` updates ``p -= lr * (wd * p + m / (sqrt(v) + eps))`` with no bias correction, so its early
    steps are up to 6.5x larger than ``torch.optim.AdamW``'s (3.2x at step 1; still 1.26x at step 1000). Given the
    learning rate times this factor and the weight decay divided by it, the update is AdamW's
    ``p -= lr * wd * p + lr * m_hat / (sqrt(v_hat) + eps')`` with ``eps' = eps / sqrt(1 - beta2^t)`` (eps is 1e-8).
    """

    def __init__(self, value, betas: tuple, inverse: bool = False):
        super().__init__()
        self.value = value
        self.beta1, self.beta2 = Tensor(betas[0], ms.float32), Tensor(betas[1], ms.float32)
        self.inverse = inverse

    def construct(self, global_step):
        t = global_step.astype(ms.float32) + 1.0
        factor = ops.sqrt(1.0 - ops.pow(self.beta2, t)) / (1.0 - ops.pow(self.beta1, t))
        return (self.value / factor if self.inverse else self.value * factor).reshape(())


class Trainer(nn.Cell):
    """Owns a loss Cell (its ``model`` is what is trained), optimizer, EMA and gradient buffers. ``step(*batch)`` is
    one compiled graph per optimizer step: loss and gradients of the (last) micro-batch, cross-rank mean, accumulated
    sum, clipping, AdamW, EMA. With gradient accumulation the earlier micro-batches go through ``accumulate``. The
    batch is whatever the loss Cell's ``construct`` takes (``FlowMatchingLoss``, ``vae_training.VAELoss``).

    Mixed precision: the model computes in ``cfg.precision`` (``Cell.to_float``: inputs and parameters cast inside
    the graph) while parameters, gradients, optimizer state, EMA and the loss stay fp32. fp16 scales the loss
    dynamically and skips the update of a step whose gradients overflow; bf16 has fp32's range and needs no scaling.

    ZeRO stage 1 (``zero_stage: 1`` under msrun) goes through mindone's ``ZeroHelper``: each rank keeps the AdamW
    moments (and a working copy of the weights) of 1/world of every parameter whose first dimension divides by the
    world size, updates that slice and all-gathers the weights. Gradients are still mean-reduced whole, so clipping
    sees the global norm; checkpoints hold the gathered, whole optimizer state.
    """

    def __init__(self, loss: nn.Cell, cfg: Recipe, world: int = 1):
        super().__init__()
        model = loss.model
        # Parameter.name carries the path of the Cells holding the model ("loss.model."); checkpoints keep the model's
        # own names, which parameters_and_names gives relative to it
        named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]
        self.param_names = tuple(n for n, _ in named)
        backend.check_dtype_supported(PRECISIONS[cfg.precision])
        if cfg.precision != "fp32":
            model.to_float(PRECISIONS[cfg.precision])
        self.loss = loss
        params = [p for _, p in named]
        self.params = ParameterTuple(params)
        # the learning rate of the current step (``step`` assigns it); the optimizer reads it through a schedule Cell,
        # as a Parameter passed as learning_rate would be copied at construction
        self.lr = Parameter(Tensor(cfg.lr, ms.float32), name="lr", requires_grad=False)
        # nn.AdamWeightDecay (mint's AdamW has no CPU kernel), made torch.optim.AdamW by the bias correction
        self.optimizer = nn.AdamWeightDecay(
            params,
            learning_rate=AdamWBiasCorrection(self.lr, ADAM_BETAS),
            weight_decay=AdamWBiasCorrection(Tensor(cfg.weight_decay, ms.float32), ADAM_BETAS, inverse=True),
            beta1=ADAM_BETAS[0],
            beta2=ADAM_BETAS[1],
            eps=ADAM_EPS,
        )
        self.ema = self.params.clone("ema", "same")
        self.grads = self.params.clone("grad_acc", "zeros")
        self.ema_decay = Tensor(cfg.ema_decay, ms.float32)
        self.clip = cfg.grad_clip
        self.accum = cfg.grad_accum
        self.hyper_map = ops.HyperMap()
        self.scaled = cfg.precision == "fp16"
        self.scaler = ms.amp.DynamicLossScaler(cfg.loss_scale, 2, 1000) if self.scaled else None
        self.skipped = Parameter(Tensor(0, ms.int32), name="skipped_steps", requires_grad=False)
        self.grad_fn = ms.value_and_grad(self._scaled_loss, None, self.params)
        # data parallel (msrun): gradients are mean-reduced across ranks before they are accumulated
        self.grad_reducer = nn.DistributedGradReducer(params, mean=True, degree=world) if world > 1 else None
        self.zero = (
            _zero_helper(self.optimizer, os.path.join(cfg.output, "zero")) if cfg.zero_stage and world > 1 else None
        )
        self.world = world

    def _optimizer_entries(self) -> list:
        """AdamW's own state (moments, step, learning rate): not the weights, nor ZeRO's working copy of them."""
        skip = {id(p) for p in self.params}
        if self.zero is not None:
            skip |= {id(p) for p in self.zero.optimizer._parameters}
        return [p for p in self.optimizer.get_parameters() if id(p) not in skip]

    def _sharded_names(self) -> set:
        if self.zero is None:
            return set()
        opt, split = self.optimizer, self.zero.need_parameter_split
        return {m[i].name for m in (opt.moments1, opt.moments2) for i in range(len(split)) if split[i]}

    def _slice(self, value, rows: int):
        """This rank's ``rows`` rows of a whole array, as ZeroHelper splits along dim 0."""
        return value[self.zero.op_rank_id * rows : (self.zero.op_rank_id + 1) * rows]

    def optimizer_state(self) -> dict:
        """Name -> whole array of AdamW's state on every rank. Under ZeRO the slices are all-gathered (along dim 0,
        as ZeroHelper split them), so every rank must call this."""
        sharded = self._sharded_names()
        gather = self.zero.op_allgather if self.zero is not None else None
        return {p.name: (gather(p.value()) if p.name in sharded else p).asnumpy() for p in self._optimizer_entries()}

    def optimizer_shapes(self) -> dict:
        """Name -> whole shape of each entry of ``optimizer_state``."""
        sharded = self._sharded_names()
        return {
            p.name: (p.shape[0] * self.world, *p.shape[1:]) if p.name in sharded else tuple(p.shape)
            for p in self._optimizer_entries()
        }

    def load_optimizer_state(self, state: dict) -> None:
        """Inverse of ``optimizer_state`` (shapes checked by the caller): each rank takes its slice."""
        sharded = self._sharded_names()
        for p in self._optimizer_entries():
            value = self._slice(state[p.name], p.shape[0]) if p.name in sharded else state[p.name]
            p.set_data(Tensor(value, p.dtype))
        if self.zero is not None:  # ZeRO's working copy of the weights must follow the loaded weights
            for copy, weight, split in zip(
                self.zero.optimizer._parameters, self.params, self.zero.need_parameter_split
            ):
                value = self._slice(weight.asnumpy(), copy.shape[0]) if split else weight.asnumpy()
                copy.set_data(Tensor(value, copy.dtype))

    def _scaled_loss(self, *batch):
        loss = self.loss(*batch)
        return self.scaler.scale(loss) if self.scaled else loss

    def _grads(self, batch):
        loss, grads = self.grad_fn(*batch)
        if self.scaled:
            loss, grads = self.scaler.unscale(loss), self.scaler.unscale(grads)
        if self.grad_reducer is not None:
            grads = self.grad_reducer(grads)
        return loss, grads

    @ms.jit
    def accumulate(self, *batch):
        """A micro-batch before the last: its gradients are added to the buffers."""
        loss, grads = self._grads(batch)
        self.hyper_map(_accumulate, self.grads, grads)
        return loss

    @ms.jit
    def step(self, lr, *batch):
        """The last micro-batch and the update at learning rate ``lr`` (a scalar Tensor): returns (loss, gradient norm
        before clipping). The rate is an input, assigned inside the graph: ``set_data`` on a Parameter handed to
        ``nn.AdamWeightDecay`` as its learning rate never reached the update (measured: every step ran at the rate the
        Parameter held at construction), so no schedule applied."""
        ops.assign(self.lr, lr)
        loss, grads = self._grads(batch)
        if self.accum > 1:
            grads = self.hyper_map(_add, self.grads, grads)
            grads = self.hyper_map(ops.partial(_scale, 1.0 / self.accum), grads)
        # one global norm for the log and for clipping (clip_by_global_norm would compute it again per tensor)
        grad_norm = ops.sqrt(ops.addn([ops.reduce_sum(g * g) for g in grads]))
        if self.scaled:
            finite = ms.amp.all_finite(grads)
            self.scaler.adjust(finite)
            if finite:
                self._update(grads, grad_norm)
            else:
                ops.assign_add(self.skipped, ops.ones((), ms.int32))
        else:
            self._update(grads, grad_norm)
        if self.accum > 1:
            self.hyper_map(_zero, self.grads)
        return loss, grad_norm

    def _update(self, grads, grad_norm):
        # clip_by_global_norm's rule: g * clip / max(norm, clip)
        factor = self.clip / ops.maximum(grad_norm, self.clip)
        grads = self.hyper_map(ops.partial(_scale, factor), grads)
        if self.zero is None:
            self.optimizer(grads)
        else:  # this rank's slice of each sharded gradient; the helper all-gathers the updated weights
            rank, split = self.zero.op_rank_id, self.zero.need_parameter_split
            grads = self.hyper_map(ops.partial(_shard, self.zero.split_op, rank), grads, split)
            self.zero.run_optimizer(grads)
        self.hyper_map(ops.partial(_ema_update, self.ema_decay), self.ema, self.params)


def _zero_helper(optimizer, info_dir: str):
    """mindone's ZeRO stage 1 over the whole data-parallel world (needs msrun and ParallelMode.DATA_PARALLEL)."""
    from mindone.trainers.zero import ZeroHelper
    from mindspore.communication import GlobalComm

    helper = ZeroHelper(optimizer, 1, GlobalComm.WORLD_COMM_GROUP, params_split_info=info_dir)
    if helper.zero_stage != 1:
        raise ValueError("zero_stage 1 needs data-parallel mode: launch with msrun (tools/train.py sets it)")
    helper.split_params()
    return helper


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints: a folder per save, the "latest" pointer replaced last
# ------------------------------------------------------------------------------------------------------------------
def _save_arrays(path: str, arrays: dict):
    tmp = path + ".tmp"
    save_file(arrays, tmp)
    os.replace(tmp, path)


def save_checkpoint(run: str, trainer, step: int, state: dict, optimizer: dict | None = None) -> str:
    """Write model, EMA and optimizer state to ``checkpoints/step_N`` (via a temporary folder) and then point
    ``checkpoints/latest`` at it; a save killed at any point leaves the previous checkpoint the latest.
    ``optimizer``: the state from ``trainer.optimizer_state()`` when the caller gathered it on every rank."""
    root = os.path.join(run, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:07d}")
    tmp = tempfile.mkdtemp(dir=root, prefix=".saving-")
    model = {n: p.asnumpy() for n, p in zip(trainer.param_names, trainer.params)}
    ema = {n: e.asnumpy() for n, e in zip(trainer.param_names, trainer.ema)}
    opt = trainer.optimizer_state() if optimizer is None else optimizer
    _save_arrays(os.path.join(tmp, "model.safetensors"), model)
    _save_arrays(os.path.join(tmp, "ema.safetensors"), ema)
    _save_arrays(os.path.join(tmp, "optimizer.safetensors"), opt)
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({**state, "step": step}, f)
    # saving a step again (a re-run) goes to a new name: the folder "latest" names is never touched before the
    # pointer has moved, so a kill at any moment leaves "latest" naming a complete checkpoint
    version = 1
    while os.path.exists(final if version == 1 else f"{final}.v{version}"):
        version += 1
    target = final if version == 1 else f"{final}.v{version}"
    os.replace(tmp, target)
    pointer = os.path.join(root, "latest")
    with open(pointer + ".tmp", "w") as f:
        f.write(os.path.basename(target))
    os.replace(pointer + ".tmp", pointer)
    superseded = [final] + [f"{final}.v{v}" for v in range(2, version)] if version > 1 else []
    for older in superseded:  # earlier saves of this step, no longer named by "latest"
        shutil.rmtree(older, ignore_errors=True)
    return target


def latest_checkpoint(run: str) -> str | None:
    pointer = os.path.join(run, "checkpoints", "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(run, "checkpoints", f.read().strip())


def load_checkpoint(folder: str, trainer) -> dict:
    """Restore weights, EMA and optimizer state; every file is checked (names, shapes) before anything changes."""
    model = load_file(os.path.join(folder, "model.safetensors"))
    ema = load_file(os.path.join(folder, "ema.safetensors"))
    opt = load_file(os.path.join(folder, "optimizer.safetensors"))
    shapes = {n: tuple(p.shape) for n, p in zip(trainer.param_names, trainer.params)}
    for name, state, expected in (
        ("model", model, shapes),
        ("ema", ema, shapes),
        ("optimizer", opt, trainer.optimizer_shapes()),
    ):
        report = compare_shapes(expected, state)
        if not report.ok:
            raise ValueError(
                f"cannot resume from {folder}: {name}.safetensors does not match this recipe's model "
                f"({report.describe()}); the recipe changed since that run, so use a new output folder or restore it"
            )
    for n, p, e in zip(trainer.param_names, trainer.params, trainer.ema):
        p.set_data(Tensor(model[n], p.dtype))
        e.set_data(Tensor(ema[n], e.dtype))
    trainer.load_optimizer_state(opt)
    with open(os.path.join(folder, "state.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, cap_dim: int) -> nextdit.NextDiT:
    arch = nextdit.resolve_config(cfg.model)
    if arch.cap_feat_dim != cap_dim:
        raise ValueError(f"model cap_feat_dim {arch.cap_feat_dim} != text encoder hidden size {cap_dim}")
    model = nextdit.NextDiT(arch)
    if cfg.init:
        from .nextdit_weights import load_nextdit_state

        load_state_dict(model, load_nextdit_state(cfg.init, arch), what=cfg.init)
    if cfg.recompute:
        for block in model.layers:
            block.recompute()
    return model


def _progress_bar(start: int, end: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=end, initial=start, disable=not enabled, desc="training", unit="step", leave=False)


def data_parallel_world() -> tuple:
    """(rank, world size): (0, 1) in a plain process; under msrun, communication initialised and data-parallel mode
    set (gradients mean-reduced), one data shard per rank. Call after ``ms.set_device``."""
    if int(os.environ.get("MS_WORKER_NUM", "1")) <= 1:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return get_rank(), get_group_size()


def train(cfg: TrainConfig, rank: int = 0, world: int = 1, log=print, stop_after=None, progress: bool = True):
    """Train (or resume) the Next-DiT run in ``cfg.output``; returns the trainer. ``stop_after`` ends early (tests)."""
    ms.set_context(mode=ms.GRAPH_MODE if cfg.mode == "graph" else ms.PYNATIVE_MODE)
    ms.set_seed(cfg.seed)
    tokenizer = gemma.load_tokenizer(cfg.text_encoder)
    encoder = gemma.load_gemma(cfg.text_encoder)
    vae = None if cfg.vae is None else vae_lib.load_vae(cfg.vae)
    ds = prepare_data(cfg, tokenizer, encoder, vae, log)
    del encoder, vae
    model = build_model(cfg, ds.cap_feats.shape[-1])
    trainer = Trainer(FlowMatchingLoss(model), cfg, world)
    tables = {}  # RoPE inputs per latent size

    def batch_at(index: int):
        x1, x0, t, feats, mask, idx = make_batch(ds, cfg, index, rank, world)
        if x1.shape[2:] not in tables:
            tables[x1.shape[2:]] = nextdit.rope_inputs(model.cfg, x1.shape[2], x1.shape[3], 1.0)
        return (*map(Tensor, (x1, x0, t, feats, mask)), *tables[x1.shape[2:]]), idx

    what = f"Next-DiT {parameter_count(model):,} parameters, {len(ds.latents)} samples"
    return fit(cfg, trainer, batch_at, what, rank, world, log, stop_after, progress)


def fit(cfg: Recipe, trainer: Trainer, batch_at, what: str, rank=0, world=1, log=print, stop_after=None, progress=True):
    """The loop every recipe shares: resume from ``output/checkpoints/latest``, run the steps, log, save.

    ``batch_at(index)`` gives micro-batch ``index`` (``step * grad_accum + micro``) of this rank as (Tensors for
    ``trainer.step``, sample indices). Returns the trainer with ``history`` (step, loss, lr) and ``seen`` (indices).
    """
    start = 0
    resume = latest_checkpoint(cfg.output)
    if resume:
        state = load_checkpoint(resume, trainer)
        start = state["step"]
        if trainer.scaled and "loss_scale" in state:  # fp16: continue with the scaler's state
            trainer.scaler.scale_value.set_data(Tensor(state["loss_scale"], ms.float32))
            trainer.scaler.counter.set_data(Tensor(state["loss_scale_counter"], ms.int32))
        trainer.skipped.set_data(Tensor(state.get("skipped_steps", 0), ms.int32))
        log(f"resumed from {resume} at step {start}")
    log(f"{what}, start step {start}")
    history, seen = [], []
    t_log = time.perf_counter()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = _progress_bar(start, end, enabled=progress and rank == 0)
    for step in range(start, end):
        lr = Tensor(lr_at(cfg, step), ms.float32)
        losses = []
        for micro in range(cfg.grad_accum):
            batch, idx = batch_at(step * cfg.grad_accum + micro)
            seen.extend(int(i) for i in idx)
            if micro + 1 < cfg.grad_accum:
                losses.append(float(trainer.accumulate(*batch).asnumpy()))
            else:
                loss, grad_norm = trainer.step(lr, *batch)
                losses.append(float(loss.asnumpy()))
                grad_norm = float(grad_norm.asnumpy())
        bar.update(1)
        history.append((step + 1, float(np.mean(losses)), lr_at(cfg, step)))
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            rate = cfg.log_every * cfg.batch_size * cfg.grad_accum * world / (time.perf_counter() - t_log)
            line = (f"step {step + 1}/{cfg.steps} loss {history[-1][1]:.4f} lr {history[-1][2]:.2e} "
                    f"grad_norm {grad_norm:.3f} {rate:.1f} samples/s")  # fmt: skip
            if trainer.scaled:
                scale = float(trainer.scaler.scale_value.asnumpy())
                line += f" loss_scale {scale:g} skipped {int(trainer.skipped.asnumpy())}"
            log(line)
            t_log = time.perf_counter()
        if (step + 1) % cfg.save_every == 0 or step + 1 == end:
            # under ZeRO gathering the optimizer state is a collective: every rank takes part, rank 0 writes
            opt = trainer.optimizer_state() if rank == 0 or trainer.zero is not None else None
            if rank == 0:
                state = {"history": history[-cfg.save_every :], "skipped_steps": int(trainer.skipped.asnumpy())}
                if trainer.scaled:
                    state["loss_scale"] = float(trainer.scaler.scale_value.asnumpy())
                    state["loss_scale_counter"] = int(trainer.scaler.counter.asnumpy())
                save_checkpoint(cfg.output, trainer, step + 1, state, opt)
    bar.close()
    if world > 1:  # every rank leaves after rank 0's last save, so a relaunch resumes from it on every rank
        from mindspore.mint.distributed import barrier

        barrier()
    trainer.history, trainer.seen = history, seen
    return trainer


def export_pipeline(cfg: TrainConfig, trainer: Trainer, folder: str, use_ema: bool = True) -> None:
    """Write a pipeline folder ``LuminaNextPipeline.from_pretrained`` reads: model_index.json, transformer/ (config.json
    + original-named safetensors, EMA weights by default), text_encoder/ and tokenizer/ (copies), vae/ or none."""
    from .nextdit_weights import diffusers_config

    model = trainer.loss.model
    with checkpoint_io.staged_folder(folder) as tmp:
        os.makedirs(os.path.join(tmp, "transformer"))
        factor = 1 if cfg.vae is None else vae_lib.load_config(cfg.vae).downsample_factor
        conf = {**diffusers_config(model.cfg), "sample_size": cfg.resolution // factor}
        with open(os.path.join(tmp, "transformer", "config.json"), "w") as f:
            json.dump(conf, f, indent=1)
        source = trainer.ema if use_ema else trainer.params
        weights = {n: p.asnumpy() for n, p in zip(trainer.param_names, source)}
        save_file(weights, os.path.join(tmp, "transformer", "model.safetensors"))
        shutil.copytree(cfg.text_encoder, os.path.join(tmp, "text_encoder"))
        tokenizer_only = shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json")
        shutil.copytree(cfg.text_encoder, os.path.join(tmp, "tokenizer"), ignore=tokenizer_only)  # tokenizer files only
        if cfg.vae is not None:
            shutil.copytree(vae_lib.vae_folder(cfg.vae), os.path.join(tmp, "vae"))
        index = {
            "_class_name": "LuminaPipeline",
            "transformer": ["diffusers", "LuminaNextDiT2DModel"],
            "text_encoder": ["transformers", "GemmaModel"],
            "tokenizer": ["transformers", "GemmaTokenizerFast"],
            "vae": None if cfg.vae is None else ["diffusers", "AutoencoderKL"],
            "train_size": cfg.resolution,
        }
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(index, f, indent=1)
