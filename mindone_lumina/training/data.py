"""Training data: aspect-ratio buckets, images and captions read from a ``captions.jsonl`` folder, cached latents
and caption features, and the host-side batches. Everything random (shuffling, caption dropout, t, noise) is drawn
from ``(seed, step, rank)``, so a resumed run sees exactly what an uninterrupted one does."""

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import load_file, save_file

import mindspore as ms

from ..atomic import atomic_path, check_creatable
from ..models import vae as vae_lib
from ..text import gemma
from .recipe import Recipe, TrainConfig


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


def folder_digest(folder: str) -> str:
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
    check_creatable(cache_dir)  # made only to write the cache: bad data below leaves no empty folder behind
    bucket_list = buckets(cfg.resolution, cfg.aspect_ratios, cfg.bucket_multiple)
    rows = read_captions(cfg.data)
    key = hashlib.sha256(
        json.dumps(
            {
                "encoder": folder_digest(cfg.text_encoder),
                "vae": None if cfg.vae is None else folder_digest(cfg.vae),
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
    arrays = {f"latent.{i}": z for i, z in enumerate(encode_latents(images, vae))}
    feats, mask = _encode_unique(tokenizer, encoder, captions + [""], cfg.max_caption_tokens)
    arrays.update(cap_feats=feats[:-1], cap_mask=mask[:-1], empty_feats=feats[-1], empty_mask=mask[-1])
    arrays["skipped"] = np.array([skipped.get(UNREADABLE, 0), skipped.get(TOO_SMALL, 0)], np.int64)
    with atomic_path(path) as tmp:  # ranks sharing the folder each write their own temporary
        save_file(arrays, tmp)
    log(f"cached {len(images)} samples in {path}")
    return _dataset_from_arrays(arrays, skipped)


def encode_latents(images: list, vae, chunk: int = 64) -> list:
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
