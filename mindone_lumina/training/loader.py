"""The Next-DiT training data pipeline (issue #27): batches of one aspect-ratio bucket per data-parallel rank, made
ahead of the step by worker processes of ``mindspore.dataset``, from one of two sources:

* ``CachedSamples``: a feature store (``feature_store``, written by ``extract``): VAE latents and caption features
  memory-mapped one sample at a time;
* ``OnlineSamples``: the images and captions themselves; the workers read and resize the images, and the training
  process runs the frozen VAE and text encoder on each batch (``finish``), as the original Lumina training does.

A batch is a pure function of (seed, micro-batch index, rank) (``data.batch_indices``, ``data.draws``), so the
pipeline starts at any index: a resumed run sees exactly the batches an uninterrupted one does, whatever the number
of workers. Host memory stays flat in the dataset size: the index is a few NumPy columns (shared by the forked
workers), and only the batches in flight are held.
"""

import os

import numpy as np

import mindspore as ms

from ..atomic import atomic_path
from ..models import vae as vae_lib
from ..text import gemma
from .data import batch_indices, draws, image_bucket, load_image
from .extract import REASONS, entry_problem  # skip reasons; an online scan codes one as -1 - its position
from .feature_store import FeatureStore
from .recipe import TrainConfig
from .sources import items_digest


def by_reason(counts: dict) -> dict:
    """The non-zero ``counts`` in the order of ``REASONS`` (then any other reason, sorted): one way to print them."""
    order = list(REASONS) + sorted(set(counts) - set(REASONS))
    return {reason: counts[reason] for reason in order if counts.get(reason)}


def count_skipped(codes: np.ndarray) -> dict:
    """Skipped items by reason from ``scan``'s codes."""
    return by_reason({reason: int((codes == -1 - n).sum()) for n, reason in enumerate(REASONS)})


def _pad_length(longest: int, max_tokens: int) -> int:
    """Caption length of every batch: the longest caption rounded up to 8, at most ``max_tokens`` (one graph)."""
    return min(max_tokens, (longest + 7) // 8 * 8)


class CachedSamples:
    """Latents and caption features from a feature store. ``groups``: sample indices per latent shape (bucket)."""

    def __init__(self, store: FeatureStore, max_tokens: int):
        table, codes = store.shape_codes("latent")
        self.shapes = sorted(table)
        self.groups = [np.flatnonzero(codes == table.index(shape)) for shape in self.shapes]
        cap_table, _ = store.shape_codes("cap_feats")
        self.cap_length = _pad_length(max(shape[0] for shape in cap_table), max_tokens)
        self.cap_dim = cap_table[0][1]
        self.empty = store.shared("empty_caption")["cap_feats"]  # the dropped caption: "" (BOS only)
        self.store, self.skipped, self.size = store, by_reason(store.skipped), len(store)

    def latent_shape(self, i: int) -> tuple:
        return self.store.shapes(int(i))["latent"]

    def fetch(self, idx: np.ndarray, drop: np.ndarray) -> tuple:
        """(x1 (B, C, h, w), caption features (B, Lc, D), mask (B, Lc), unreadable count) in a worker."""
        feats = np.zeros((len(idx), self.cap_length, self.cap_dim), np.float32)
        mask = np.zeros((len(idx), self.cap_length), np.int32)
        latents = []
        for row, (i, dropped) in enumerate(zip(idx, drop)):
            sample = self.store[int(i)]
            latents.append(sample["latent"])
            f = self.empty if dropped else sample["cap_feats"]
            n = min(self.cap_length, len(f))
            feats[row, :n], mask[row, :n] = f[:n], 1
        return np.stack(latents), feats, mask, 0

    def finish(self, x1, feats, mask, idx, drop) -> tuple:
        return x1, feats, mask


class OnlineSamples:
    """Images and captions read per batch; ``finish`` encodes them with the frozen VAE and text encoder.

    Args:
        items: ``sources.Item`` list; ``codes``: per item its bucket (>= 0) or -1 - the position of its skip reason
            in ``REASONS`` (``scan``).
        bucket_list: (H, W) buckets; tokenizer, encoder, vae: the frozen models (``vae`` None: pixel space).
        max_tokens: caption token limit; every batch is padded to it (one graph shape for the encoder and model).
    """

    def __init__(self, items: list, codes: np.ndarray, bucket_list: list, tokenizer, encoder, vae, max_tokens: int):
        kept = np.flatnonzero(codes >= 0)
        if not len(kept):
            raise ValueError(f"none of the {len(items)} items has a readable image and a caption")
        self.images = _Strings([items[i].image for i in kept])  # compact columns, not Item objects
        self.captions = _Strings([items[i].caption for i in kept])
        buckets_of = codes[kept]
        used = sorted(set(buckets_of.tolist()))
        self.groups = [np.flatnonzero(buckets_of == b) for b in used]
        self._bucket = buckets_of
        self.bucket_list = bucket_list
        self.skipped = count_skipped(codes)
        self.size, self.max_tokens, self.cap_dim = len(kept), max_tokens, encoder.cfg.hidden_size
        self.cap_length = (max_tokens + 7) // 8 * 8  # every batch padded to it: one graph shape
        self.latent = (3, 1) if vae is None else (vae.cfg.latent_channels, vae.cfg.downsample_factor)
        self.tokenizer, self.encoder, self.vae = tokenizer, encoder, vae

    def __getstate__(self) -> dict:  # the workers read images; the models stay in the training process
        return {k: v for k, v in self.__dict__.items() if k not in ("tokenizer", "encoder", "vae")}

    def latent_shape(self, i: int) -> tuple:
        h, w = self.bucket_list[self._bucket[int(i)]]
        channels, f = self.latent
        return (channels, h // f, w // f)

    def fetch(self, idx: np.ndarray, drop: np.ndarray) -> tuple:
        """(images (B, 3, H, W), -, -, count of images that failed to read) in a worker; a failed image is replaced
        by another of its batch (same bucket), so a file broken since the scan never stops the run."""
        images = [load_image(self.images[i], self.bucket_list) for i in idx]
        good = [im for im in images if not isinstance(im, str)]
        if not good:
            raise ValueError(f"no image of a batch could be read: {[self.images[i] for i in idx]}")
        bad = len(images) - len(good)
        images = [good[n % len(good)] if isinstance(im, str) else im for n, im in enumerate(images)]
        none = np.zeros(1, np.float32)  # the features are made by ``finish``
        return np.stack(images), none, none, bad

    def finish(self, images, feats, mask, idx, drop) -> tuple:
        """The batch's latents and caption features (dropped captions are ""), in the training process."""
        captions = ["" if d else self.captions[i] for i, d in zip(idx, drop)]
        feats, mask = gemma.encode_prompts(self.tokenizer, self.encoder, captions, None, self.max_tokens, True)
        feats, mask = feats.astype(ms.float32).asnumpy(), mask.asnumpy()  # (B, cap_length, D), (B, cap_length)
        assert feats.shape[1] == self.cap_length, feats.shape
        feats = feats * mask[..., None].astype(np.float32)  # zeros past each caption, as the store pads
        x1 = images if self.vae is None else vae_lib.images_to_latents(self.vae, images).astype(np.float32)
        return x1, feats, mask.astype(np.int32)


class _Strings:
    """A list of strings as one UTF-8 buffer and offsets (a few bytes of overhead each, nothing for a forked worker
    to copy): ``strings[i]``."""

    def __init__(self, strings: list):
        data = [x.encode() for x in strings]
        self.offsets = np.concatenate([[0], np.cumsum([len(b) for b in data], dtype=np.int64)])
        self.buffer = np.frombuffer(b"".join(data), np.uint8)

    def __getitem__(self, i: int) -> str:
        return self.buffer[self.offsets[i] : self.offsets[i + 1]].tobytes().decode()


def scan(items: list, bucket_list: list, cache_dir: str | None = None, log=print) -> np.ndarray:
    """Each item's bucket from its image header, or -1 - the position of its skip reason in ``REASONS``. With
    ``cache_dir`` the result is kept there (keyed by the items and buckets) so that a resumed run skips the scan."""
    key = items_digest(items) + "-" + "-".join(f"{h}x{w}" for h, w in bucket_list)
    path = None if cache_dir is None else os.path.join(cache_dir, f"scan-{key}.npy")
    if path and os.path.isfile(path):
        return np.load(path)
    codes = np.empty(len(items), np.int32)
    for n, item in enumerate(items):
        found = entry_problem(item) or image_bucket(item.image, bucket_list)
        codes[n] = -1 - REASONS.index(found) if isinstance(found, str) else found
        if (n + 1) % 100_000 == 0:
            log(f"scanned {n + 1} / {len(items)} images")
    if path and (codes >= 0).any():  # a list with nothing usable fails the run, which leaves no folder
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, codes)
    return codes


class _Steps:
    """Random access to micro-batches ``first .. last - 1`` of ``rank`` for ``mindspore.dataset.GeneratorDataset``
    (picklable: the workers get a copy)."""

    def __init__(self, samples, cfg: TrainConfig, first: int, last: int, rank: int, world: int):
        self.samples, self.cfg, self.first, self.last, self.rank, self.world = samples, cfg, first, last, rank, world

    def __len__(self) -> int:
        return self.last - self.first

    def __getitem__(self, k: int) -> tuple:
        index = self.first + int(k)
        idx = batch_indices(self.samples.groups, self.cfg, index, self.rank, self.world)
        x0, t, drop = draws(self.cfg, index, self.samples.latent_shape(idx[0]), self.rank, self.world)
        x1, feats, mask, bad = self.samples.fetch(idx, drop)
        return x1, x0, t, feats, mask, idx.astype(np.int64), drop, np.int64(bad)


def batches(samples, cfg: TrainConfig, first: int, last: int, rank: int = 0, world: int = 1, workers: int = 2):
    """Micro-batches ``first .. last - 1`` of ``rank`` in order, as NumPy (x1, x0, t, cap_feats, cap_mask, sample
    indices) and the count of images that failed to read, prepared ahead by ``workers`` processes of
    ``mindspore.dataset`` (0: one thread of this process)."""
    import mindspore.dataset as ds

    if last <= first:
        return
    source = _Steps(samples, cfg, first, last, rank, world)
    columns = ["x1", "x0", "t", "cap_feats", "cap_mask", "idx", "drop", "bad"]
    pipeline = ds.GeneratorDataset(source, column_names=columns, shuffle=False, num_parallel_workers=max(1, workers),
                                   python_multiprocessing=workers > 0)  # fmt: skip
    for x1, x0, t, feats, mask, idx, drop, bad in pipeline.create_tuple_iterator(output_numpy=True, num_epochs=1):
        x1, feats, mask = samples.finish(x1, feats, mask, idx, drop)
        yield x1, x0, t, feats, mask, idx, int(bad)
