"""The sharded feature store (issue #27): per-sample training arrays (latents, caption features) in safetensors shards
of bounded size with a JSON index, the one reader and writer of this format.

Layout of a store folder:

* ``index-{part}.json`` per writer (``part``: e.g. the extraction rank ``r0``), so parallel writers never share a
  file: the store's ``meta`` (what the features were made with), the shards written so far, and per shard its
  samples' ids and array shapes, plus the ids of the samples skipped, per reason.
* ``{part}-{n:05d}.safetensors``: the arrays of a shard's samples, named ``{id}/{array}``.
* ``shared-{name}.safetensors``: arrays every sample shares (e.g. the empty caption's features), ``write_shared``.

A shard is written whole under a temporary name and renamed, and only then listed in its index (itself replaced
atomically), so a killed writer leaves complete shards and an index that names exactly them; reopened with the same
``part`` it goes on after the last listed shard (``done``: the ids stored or skipped before). A reader holds the index
in memory (ids and shapes: a few hundred bytes a sample as Python objects, not the arrays) and reads one sample at a
time from its memory-mapped shard.
"""

import collections
import glob
import json
import os
import re

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ..atomic import atomic_path, read_json, write_json

_PART = re.compile(r"^[A-Za-z0-9_]+$")
_OPEN_SHARDS = 8  # shard handles a reader keeps open


def _index_path(folder: str, part: str) -> str:
    return os.path.join(folder, f"index-{part}.json")


class ShardWriter:
    """Collects samples and writes them as shards of about ``max_shard_bytes``: ``commit`` ends a group of samples
    (e.g. one encoder batch) that a shard never splits, and writes the buffer once it has reached the bound.

    Args:
        folder: the store folder (created if absent).
        part: this writer's name (letters, digits, ``_``), unique among the writers of the store.
        meta: JSON-serialisable description of how the features were made; a resumed part and every other part
            must have the same, else ``ValueError`` naming the differing keys.
        max_shard_bytes: shard size bound.
    """

    def __init__(self, folder: str, part: str, meta: dict, max_shard_bytes: int = 256 << 20):
        if not _PART.match(part):
            raise ValueError(f"part must be letters, digits or _, got {part!r}")
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
        self.folder, self.part, self.max_bytes = folder, part, max_shard_bytes
        self.meta = json.loads(json.dumps(meta))  # as the index will hold it (tuples become lists)
        os.makedirs(folder, exist_ok=True)
        # temporaries of this part left by a killed run (a shard or the index being written)
        for pattern in (f".{part}-*", f".index-{part}.*"):
            for stale in glob.glob(os.path.join(folder, pattern)):
                os.remove(stale)
        indexes = {p: read_json(p) for p in glob.glob(os.path.join(folder, "index-*.json"))}
        for path, index in indexes.items():
            _check_meta(path, index.get("meta"), self.meta)
        fresh = {"meta": self.meta, "shards": [], "skipped": {}}
        self.index = indexes.get(_index_path(folder, part), fresh)
        self.stored = {s["id"] for shard in self.index["shards"] for s in shard["samples"]}
        self._skipped = {reason: list(ids) for reason, ids in self.index["skipped"].items()}
        self.done = self.stored | {i for ids in self._skipped.values() for i in ids}  # stored or skipped
        self._buffer, self._bytes, self._samples, self._buffered = {}, 0, [], set()

    def add(self, sample_id: str, arrays: dict) -> None:
        """Buffer one sample's arrays (name -> array)."""
        self._check_new(sample_id)
        shapes = {}
        for name, value in arrays.items():
            value = np.ascontiguousarray(value)
            self._buffer[f"{sample_id}/{name}"] = value
            self._bytes += value.nbytes
            shapes[name] = list(value.shape)
        self._samples.append({"id": sample_id, "shapes": shapes})
        self._buffered.add(sample_id)

    def commit(self) -> None:
        """End a group of added and skipped samples: a resumed writer finds each group whole or not at all (so a
        resumed extraction batches as an uninterrupted one). Writes the shard once the buffer reached the bound."""
        if self._bytes >= self.max_bytes:
            self.flush()

    def skip(self, sample_id: str, reason: str) -> None:
        """Record a sample that could not be stored (unreadable image, missing caption, ...), saved with the next
        shard or on ``close``; a resumed writer does not try it again (``done``), so counts stay exact."""
        self._check_new(sample_id)
        self._skipped.setdefault(reason, []).append(sample_id)
        self._buffered.add(sample_id)

    def _check_new(self, sample_id) -> None:
        if not isinstance(sample_id, str) or not sample_id or "/" in sample_id:
            raise ValueError(f"sample ids are non-empty strings without '/', got {sample_id!r}")
        if sample_id in self.done or sample_id in self._buffered:
            raise ValueError(f"sample {sample_id!r} is already in part {self.part} of {self.folder}")

    def flush(self) -> None:
        """Write the buffered samples as the next shard, then the index naming it."""
        if self._samples:
            name = f"{self.part}-{len(self.index['shards']):05d}.safetensors"
            with atomic_path(os.path.join(self.folder, name)) as tmp:
                save_file(self._buffer, tmp)
            self.index["shards"].append({"file": name, "samples": self._samples})
            self.stored.update(s["id"] for s in self._samples)
        self.index["skipped"] = {reason: list(ids) for reason, ids in self._skipped.items()}
        write_json(_index_path(self.folder, self.part), self.index)
        self.done |= self._buffered
        self._buffer, self._bytes, self._samples, self._buffered = {}, 0, [], set()

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:  # on an error the buffered samples are dropped; the written shards stay valid
            self.close()


class FeatureStore:
    """Read access to a store: ``len``, ``ids``, ``shapes(i)`` from the index alone, ``store[i]`` -> {name: array}.

    Samples are ordered by id (numerically where every id is an integer), whichever part wrote them, so the order
    does not depend on how extraction was split."""

    def __init__(self, folder: str):
        paths = sorted(glob.glob(os.path.join(folder, "index-*.json")))
        if not paths:
            raise ValueError(f"{folder} is not a feature store: it has no index-*.json")
        self.folder, self.skipped, rows = folder, {}, []
        indexes = [read_json(path) for path in paths]
        self.meta = indexes[0].get("meta")
        for path, index in zip(paths, indexes):
            _check_meta(path, index.get("meta"), self.meta)
            for reason, ids in index.get("skipped", {}).items():
                self.skipped[reason] = self.skipped.get(reason, 0) + len(ids)
            for shard in index["shards"]:
                file = os.path.join(folder, shard["file"])
                if not os.path.isfile(file):
                    raise ValueError(f"{path} lists {shard['file']}, which is missing from {folder}")
                rows += [(s["id"], file, s["shapes"]) for s in shard["samples"]]
        ids = [r[0] for r in rows]
        if len(set(ids)) != len(ids):
            seen = sorted(i for i, n in collections.Counter(ids).items() if n > 1)[:5]
            raise ValueError(f"{folder}: sample ids stored more than once, e.g. {seen}")
        numeric = all(i.isdigit() for i in ids)
        self._rows = sorted(rows, key=lambda r: int(r[0]) if numeric else r[0])
        self.ids = [r[0] for r in self._rows]
        self._open = {}  # file -> handle of the most recently read shards (memory-mapped)

    def __len__(self) -> int:
        return len(self._rows)

    def shapes(self, i: int) -> dict:
        """{array name: shape tuple} of sample ``i``, without reading it."""
        return {k: tuple(v) for k, v in self._rows[i][2].items()}

    def shared(self, name: str) -> dict:
        """The arrays ``write_shared`` stored as ``name``."""
        path = os.path.join(self.folder, f"shared-{name}.safetensors")
        if not os.path.isfile(path):
            raise ValueError(f"{self.folder} has no shared arrays {name!r} ({os.path.basename(path)})")
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def __getitem__(self, i: int) -> dict:
        sample_id, file, shapes = self._rows[i]
        if file not in self._open:
            if len(self._open) >= _OPEN_SHARDS:
                self._open.pop(next(iter(self._open)))  # the oldest
            self._open[file] = safe_open(file, framework="numpy")
        return {name: self._open[file].get_tensor(f"{sample_id}/{name}") for name in shapes}


def write_shared(folder: str, name: str, arrays: dict) -> None:
    """Write ``arrays`` (name -> array) as the store's shared ``name`` (atomically; replaces an earlier one)."""
    if not _PART.match(name):
        raise ValueError(f"shared array set names are letters, digits or _, got {name!r}")
    with atomic_path(os.path.join(folder, f"shared-{name}.safetensors")) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp)


def _check_meta(path: str, got, want) -> None:
    if got != want:
        got, want = got or {}, want or {}
        differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise ValueError(f"{path} was made with other settings: {differ} differ; use another store folder")
