"""Training data: aspect-ratio buckets, images at their bucket, VAE latents, and what each batch draws. Everything
random (the samples of a batch, caption dropout, t, noise) is drawn from ``(seed, step, rank)``, so a resumed run
sees exactly what an uninterrupted one does."""

import hashlib
import math
import os

import numpy as np

from ..models import vae as vae_lib
from .recipe import Recipe, TrainConfig


def buckets(resolution: int, aspect_ratios, multiple: int) -> list:
    """(height, width) pairs of about ``resolution^2`` pixels, sides multiples of ``multiple``."""
    out = []
    for ar in aspect_ratios:
        h = max(multiple, round(resolution / math.sqrt(ar) / multiple) * multiple)
        w = max(multiple, round(resolution * math.sqrt(ar) / multiple) * multiple)
        out.append((h, w))
    return sorted(set(out))


UNREADABLE, TOO_SMALL = "unreadable", "smaller than the smallest bucket"  # why an image is skipped


def load_image(path: str, bucket_list: list):
    """The image resized and centre-cropped to the bucket nearest its aspect ratio, as (3, H, W) in [-1, 1], or
    the reason it is skipped (``UNREADABLE``, ``TOO_SMALL``: fewer pixels than the smallest bucket)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return UNREADABLE
    w, h = im.size
    bucket = nearest_bucket(w, h, bucket_list)
    if isinstance(bucket, str):
        return bucket
    bh, bw = bucket_list[bucket]
    scale = max(bh / h, bw / w)
    im = im.resize((max(bw, round(w * scale)), max(bh, round(h * scale))), Image.BICUBIC)
    left, top = (im.width - bw) // 2, (im.height - bh) // 2
    arr = np.asarray(im.crop((left, top, left + bw, top + bh)), np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)) / 127.5 - 1.0


def nearest_bucket(width: int, height: int, bucket_list: list):
    """Index of the bucket nearest in aspect ratio to a ``width`` x ``height`` image, or ``TOO_SMALL`` when it has
    fewer pixels than the smallest bucket."""
    if width * height < min(bh * bw for bh, bw in bucket_list):
        return TOO_SMALL
    return min(
        range(len(bucket_list)), key=lambda n: abs(math.log((width / height) / (bucket_list[n][1] / bucket_list[n][0])))
    )


def image_bucket(path: str, bucket_list: list):
    """``nearest_bucket`` of the image at ``path`` from its header alone (the pixels are not decoded), or
    ``UNREADABLE``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, UnidentifiedImageError, ValueError):
        return UNREADABLE
    return nearest_bucket(width, height, bucket_list)


def folder_digest(folder: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith((".safetensors", ".json")):
                with open(os.path.join(root, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


def read_images(items: list, bucket_list: list, log=print) -> tuple:
    """The readable images of ``items`` (``sources.Item``) at their nearest bucket: (images, their items, counts of
    skipped ones by reason). None readable raises ``ValueError``."""
    images, kept, skipped = [], [], {}
    for item in items:
        img = UNREADABLE if item.image is None else load_image(item.image, bucket_list)
        if isinstance(img, str):
            skipped[img] = skipped.get(img, 0) + 1
            continue
        images.append(img)
        kept.append(item)
    if not images:
        raise ValueError(f"none of the {len(items)} images could be read at buckets {bucket_list}")
    if skipped:
        log(f"skipped images: {skipped}")
    return images, kept, skipped


def encode_latents(images: list, vae, chunk: int = 64) -> list:
    """Images (3, H, W) -> float32 latents, encoded ``chunk`` images of one bucket shape per VAE call (pixels as they
    are without a VAE). A call's batch is padded to a power of two (repeating its last image): batches of mixed
    buckets then make a few graph shapes per bucket, not one compile per count."""
    if vae is None:
        return [np.ascontiguousarray(img, np.float32) for img in images]
    out = [None] * len(images)
    for shape in sorted({img.shape for img in images}):
        index = [i for i, img in enumerate(images) if img.shape == shape]
        for start in range(0, len(index), chunk):
            part = index[start : start + chunk]
            padded = part + part[-1:] * ((1 << (len(part) - 1).bit_length()) - len(part))
            z = vae_lib.images_to_latents(vae, np.stack([images[i] for i in padded]))
            for i, zi in zip(part, z):
                out[i] = np.ascontiguousarray(zi, np.float32)  # safetensors writes the raw buffer
    return out


def bucket_groups(shapes: list) -> list:
    """Sample indices per distinct shape in ``shapes`` (one array per bucket, in sorted shape order)."""
    return [np.array([i for i, s in enumerate(shapes) if s == u]) for u in sorted(set(shapes))]


def batch_indices(groups: list, cfg: Recipe, step: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """The sample indices of global ``step`` for ``rank``: a per-epoch permutation from (seed, epoch) within each
    bucket (``groups``: index arrays, e.g. from ``bucket_groups``), the global batch split into ``world`` disjoint
    shards. Each epoch is every bucket's whole global batches, so a sample is seen by one rank once per epoch (a
    bucket's remainder, a different one each epoch, waits for the next)."""
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


def draws(cfg: TrainConfig, index: int, shape: tuple, rank: int = 0, world: int = 1) -> tuple:
    """Noise x0 (B, *shape), t (B,) and caption-dropout flags (B,) of micro-batch ``index`` for ``rank``.

    Drawn for the whole global batch from (seed, index) and then sliced by rank, so the ranks of a data-parallel run
    together see exactly what one process with the global batch sees.
    """
    rng = np.random.default_rng([cfg.seed, index, 1])
    n = cfg.batch_size * world
    x0 = rng.standard_normal((n, *shape)).astype(np.float32)
    u = rng.standard_normal(n) if cfg.t_sampling == "logit_normal" else rng.uniform(0.0, 1.0, n)
    t = 1.0 / (1.0 + np.exp(-u)) if cfg.t_sampling == "logit_normal" else u
    drop = rng.uniform(0.0, 1.0, n) < cfg.caption_dropout
    mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    return x0[mine], t[mine].astype(np.float32), drop[mine]


# ------------------------------------------------------------------------------------------------------------------
# The compiled step
# ------------------------------------------------------------------------------------------------------------------
