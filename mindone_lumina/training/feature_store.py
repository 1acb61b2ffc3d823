"""The sharded feature store (issue #27): per-sample training arrays (latents, caption features) in safetensors shards
of bounded size with a JSON index, the one reader and writer of this format.

Layout of a store folder:

* ``index-{part}.json`` per writer (``part``: e.g. the extraction rank ``r0``), so parallel writers never share a
  file: the store's ``meta`` (what the features were made with), the shards written so far, and per shard its
  samples' ids and, per array name, a table of the distinct shapes and each sample's row in it (columns of small
  integers: an index parses into little memory), plus the ids of the samples skipped, per reason.
* ``{part}-{n:05d}.safetensors``: the arrays of a shard's samples, named ``{id}/{array}``.
* ``shared-{name}.safetensors``: arrays every sample shares (e.g. the empty caption's features), ``write_shared``.

A shard is written whole under a temporary name and renamed, and only then listed in its index (itself replaced
atomically), so a killed writer leaves complete shards and an index that names exactly them; reopened with the same
``part`` it goes on after the last listed shard (``done``: the ids stored or skipped before). A reader holds the index
as NumPy columns (36 bytes a sample with ids of up to 6 digits, shared unchanged by forked loader workers) and reads
one sample at a time from its memory-mapped shard.
"""

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
        indexes = _read_indexes(folder, self.meta)
        fresh = {"meta": self.meta, "shards": [], "skipped": {}}
        self.index = indexes.get(_index_path(folder, part), fresh)
        self.stored = {i for shard in self.index["shards"] for i in shard["ids"]}
        self._skipped = {reason: list(ids) for reason, ids in self.index["skipped"].items()}
        self.done = _done(indexes.values())  # stored or skipped, by any part
        self._buffer, self._bytes, self._ids, self._shapes, self._buffered = {}, 0, [], {}, set()

    @staticmethod
    def done_ids(folder: str, meta: dict) -> set:
        """The ids any part of the store in ``folder`` stored or skipped (a store with another ``meta`` is refused)."""
        return _done(_read_indexes(folder, json.loads(json.dumps(meta))).values())

    def add(self, sample_id: str, arrays: dict) -> None:
        """Buffer one sample's arrays (name -> array)."""
        self._check_new(sample_id)
        if self._ids and set(arrays) != set(self._shapes):
            raise ValueError(f"sample {sample_id!r} has arrays {sorted(arrays)}, the others {sorted(self._shapes)}")
        for name, value in arrays.items():
            value = np.ascontiguousarray(value)
            self._buffer[f"{sample_id}/{name}"] = value
            self._bytes += value.nbytes
            self._shapes.setdefault(name, []).append(value.shape)
        self._ids.append(sample_id)
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
        if self._ids:
            name = f"{self.part}-{len(self.index['shards']):05d}.safetensors"
            with atomic_path(os.path.join(self.folder, name)) as tmp:
                save_file(self._buffer, tmp)
            shapes = {}
            for array, column in self._shapes.items():
                table = sorted(set(column))
                rows = {shape: n for n, shape in enumerate(table)}
                shapes[array] = {"table": [list(t) for t in table], "rows": [rows[shape] for shape in column]}
            self.index["shards"].append({"file": name, "ids": self._ids, "shapes": shapes})
            self.stored.update(self._ids)
        self.index["skipped"] = {reason: list(ids) for reason, ids in self._skipped.items()}
        write_json(_index_path(self.folder, self.part), self.index, indent=None)  # compact: 100k+ samples
        self.done |= self._buffered
        self._buffer, self._bytes, self._ids, self._shapes, self._buffered = {}, 0, [], {}, set()

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:  # on an error the buffered samples are dropped; the written shards stay valid
            self.close()


class FeatureStore:
    """Read access to a store: ``len``, ``ids``, ``shapes(i)`` and ``shape_codes(name)`` from the index alone,
    ``store[i]`` -> {name: array}.

    Samples are ordered by id (numerically where every id is an integer), whichever part wrote them, so the order
    does not depend on how extraction was split."""

    def __init__(self, folder: str):
        paths = sorted(glob.glob(os.path.join(folder, "index-*.json")))
        if not paths:
            raise ValueError(f"{folder} is not a feature store: it has no index-*.json")
        self.folder, self.skipped, self.meta = folder, {}, None
        self._files, ids, files = [], [], []
        tables, codes = {}, {}  # array name -> {shape: code}, [code arrays per shard]
        for path in paths:  # one index parsed at a time, its columns kept as arrays
            index = read_json(path)
            if self.meta is None:
                self.meta = index.get("meta")
            _check_meta(path, index.get("meta"), self.meta)
            for reason, skipped in index.get("skipped", {}).items():
                self.skipped[reason] = self.skipped.get(reason, 0) + len(skipped)
            for shard in index["shards"]:
                if not os.path.isfile(os.path.join(folder, shard["file"])):
                    raise ValueError(f"{path} lists {shard['file']}, which is missing from {folder}")
                if tables and set(shard["shapes"]) != set(tables):
                    raise ValueError(f"{path}: {shard['file']} stores arrays {sorted(shard['shapes'])}, "
                                     f"the store's other shards {sorted(tables)}")  # fmt: skip
                ids.append(np.array(shard["ids"], dtype=str))
                files.append(np.full(len(shard["ids"]), len(self._files), np.int32))
                self._files.append(os.path.join(folder, shard["file"]))
                for name, column in shard["shapes"].items():
                    table = tables.setdefault(name, {})
                    local = np.array([table.setdefault(tuple(t), len(table)) for t in column["table"]], np.int32)
                    codes.setdefault(name, []).append(local[np.asarray(column["rows"], np.int64)])
        ids = np.concatenate(ids) if ids else np.zeros(0, str)
        if len(np.unique(ids)) != len(ids):
            values, counts = np.unique(ids, return_counts=True)
            raise ValueError(f"{folder}: sample ids stored more than once, e.g. {values[counts > 1][:5].tolist()}")
        numeric = all(np.char.isdigit(ids)) if len(ids) else True
        order = np.argsort(ids.astype(np.int64) if numeric else ids, kind="stable")
        self._ids = ids[order]
        self._file = np.concatenate(files)[order] if files else np.zeros(0, np.int32)
        self._tables = {name: [None] * len(t) for name, t in tables.items()}
        for name, table in tables.items():
            for shape, code in table.items():
                self._tables[name][code] = shape
        self._codes = {name: np.concatenate(c)[order] for name, c in codes.items()}
        self._open = {}  # file -> handle of the most recently read shards (memory-mapped)

    def __len__(self) -> int:
        return len(self._ids)

    def __getstate__(self) -> dict:  # a copy for a loader worker opens its own shard handles
        return {**self.__dict__, "_open": {}}

    @property
    def ids(self) -> list:
        return self._ids.tolist()

    def shapes(self, i: int) -> dict:
        """{array name: shape tuple} of sample ``i``, without reading it."""
        return {name: self._tables[name][codes[i]] for name, codes in self._codes.items()}

    def shape_codes(self, name: str) -> tuple:
        """(the distinct shapes of array ``name``, each sample's position in that list as an int32 array)."""
        if name not in self._codes:
            raise ValueError(f"{self.folder} stores no array {name!r} (it has {sorted(self._codes)})")
        return list(self._tables[name]), self._codes[name]

    def shared(self, name: str) -> dict:
        """The arrays ``write_shared`` stored as ``name``."""
        path = os.path.join(self.folder, f"shared-{name}.safetensors")
        if not os.path.isfile(path):
            raise ValueError(f"{self.folder} has no shared arrays {name!r} ({os.path.basename(path)})")
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def __getitem__(self, i: int) -> dict:
        file = self._files[self._file[i]]
        if file not in self._open:
            if len(self._open) >= _OPEN_SHARDS:
                self._open.pop(next(iter(self._open)))  # the oldest
            self._open[file] = safe_open(file, framework="numpy")
        return {name: self._open[file].get_tensor(f"{self._ids[i]}/{name}") for name in self._codes}


def write_shared(folder: str, name: str, arrays: dict) -> None:
    """Write ``arrays`` (name -> array) as the store's shared ``name`` (atomically; replaces an earlier one)."""
    if not _PART.match(name):
        raise ValueError(f"shared array set names are letters, digits or _, got {name!r}")
    with atomic_path(os.path.join(folder, f"shared-{name}.safetensors")) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp)


def _read_indexes(folder: str, meta: dict) -> dict:
    indexes = {p: read_json(p) for p in glob.glob(os.path.join(folder, "index-*.json"))}
    for path, index in indexes.items():
        _check_meta(path, index.get("meta"), meta)
    return indexes


def _done(indexes) -> set:
    return {
        i
        for index in indexes
        for ids in [s["ids"] for s in index["shards"]] + list(index["skipped"].values())
        for i in ids
    }


def _check_meta(path: str, got, want) -> None:
    if got != want:
        got, want = got or {}, want or {}
        differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise ValueError(f"{path} was made with other settings: {differ} differ; use another store folder")
