"""Checkpoints as one reader (``tensors`` module docstring) whatever their files: a weights file, a sharded
``*.safetensors.index.json``, a folder holding one file, or the original Lumina-T2X ``consolidated[_ema].NN-of-MM.*``
model-parallel ranks merged into one world-size-1 state dict. Models never call this module; loaders do."""

import json
import os
import re
from collections.abc import Callable, Iterable

import numpy as np

from .safetensors import SafetensorsFile
from .tensors import check_not_lfs_pointer, same_bits
from .torch_pickle import PthFile

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class MultiFileCheckpoint:
    """Several readers with disjoint keys seen as one, hiding the keys ``drop(key)`` selects (e.g. an LM head that
    the encoder does not have)."""

    def __init__(self, readers: Iterable, drop: Callable[[str], bool] | None = None):
        self.readers = list(readers)
        self.path = os.path.commonpath([r.path for r in self.readers]) if self.readers else ""
        self._where = {}
        for r in self.readers:
            for k in r.keys():
                if k in self._where:
                    raise ValueError(f"key {k!r} appears in both {self._where[k].path} and {r.path}")
                if drop is None or not drop(k):
                    self._where[k] = r

    def keys(self):
        return list(self._where)

    def shape(self, key: str) -> tuple:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> str:
        return self._where[key].dtype(key)

    def read(self, key: str) -> np.ndarray:
        return self._where[key].read(key)


class ModelParallelCheckpoint:
    """Model-parallel rank files merged into one world-size-1 state dict.

    ``split_dim(key)`` gives the axis along which ranks hold slices (concatenated in rank order) or None for a tensor
    every rank holds whole (the copies must be bit-identical).
    """

    def __init__(self, ranks: list, split_dim: Callable[[str], int | None]):
        self.ranks, self.split_dim = ranks, split_dim
        first = set(ranks[0].keys())
        for r in ranks[1:]:
            if set(r.keys()) != first:
                odd = sorted(first ^ set(r.keys()))
                raise ValueError(f"{r.path} and {ranks[0].path} hold different keys: {odd[:10]}")
        self._keys = list(ranks[0].keys())

    @property
    def path(self) -> str:
        return os.path.dirname(self.ranks[0].path)

    def keys(self):
        return list(self._keys)

    def shape(self, key: str) -> tuple:
        dim, shapes = self.split_dim(key), [r.shape(key) for r in self.ranks]
        if dim is None:
            if len(set(shapes)) != 1:
                raise ValueError(f"replicated tensor {key!r} has different shapes across model-parallel ranks {shapes}")
            return shapes[0]
        rest = {s[:dim] + s[dim + 1 :] for s in shapes}
        if len(rest) != 1 or any(len(s) <= dim for s in shapes):
            raise ValueError(f"{key!r}: rank shapes {shapes} cannot be concatenated along dim {dim}")
        return shapes[0][:dim] + (sum(s[dim] for s in shapes),) + shapes[0][dim + 1 :]

    def dtype(self, key: str) -> str:
        dtypes = {r.dtype(key) for r in self.ranks}
        if len(dtypes) != 1:
            raise ValueError(f"{key!r} has different dtypes across model-parallel ranks: {sorted(dtypes)}")
        return dtypes.pop()

    def read(self, key: str) -> np.ndarray:
        dim = self.split_dim(key)
        if dim is not None:
            return np.concatenate([r.read(key) for r in self.ranks], axis=dim)
        first = self.ranks[0].read(key)
        for r in self.ranks[1:]:
            if not same_bits(r.read(key), first):
                raise ValueError(f"{key!r} should be replicated across model-parallel ranks but {r.path} differs")
        return first


_CONSOLIDATED = re.compile(r"^(consolidated(?:_ema)?)\.(\d+)-of-(\d+)\.(safetensors|pth)$")


def open_file(path: str):
    """A reader for one weights file, chosen by extension."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            return SafetensorsFile(path)
        if path.endswith(WEIGHT_SUFFIXES[1:]):
            return PthFile(path)
        check_not_lfs_pointer(path)
    except OSError as e:  # permissions, a failing disk: name the file, whichever reader met it
        raise ValueError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    raise ValueError(f"{path}: unknown weights format (expected .safetensors, .pth, .pt or .bin)")


def open_checkpoint(path: str, ema: bool = False, split_dim: Callable[[str], int | None] | None = None):
    """A weights file, or a folder holding: a ``*.safetensors.index.json`` and its shards; original
    ``consolidated[_ema].NN-of-MM.{safetensors,pth}`` rank files (``ema`` picks ``consolidated_ema``; with MM > 1
    ``split_dim`` says how to merge); or one weights file.
    """
    if not os.path.isdir(path):
        m = _CONSOLIDATED.match(os.path.basename(path))
        if m and int(m.group(3)) > 1:
            raise ValueError(f"{path} is one of {int(m.group(3))} model-parallel shards: pass the folder instead")
        return open_file(path)
    names = sorted(os.listdir(path))
    groups = {
        (m.group(1), int(m.group(3)), m.group(4)) for m in map(_CONSOLIDATED.match, names) if m
    }  # prefix, world, ext
    if groups:
        return _open_consolidated(path, groups, "consolidated_ema" if ema else "consolidated", split_dim)
    if ema:
        raise ValueError(f"{path}: ema weights were asked for, but there are no consolidated_ema.* files")
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(indexes) > 1:
        raise ValueError(f"{path}: several index files {indexes}")
    if indexes:
        return _open_index(os.path.join(path, indexes[0]))
    files = [n for n in names if n.endswith(WEIGHT_SUFFIXES)]
    if len(files) != 1:
        raise ValueError(f"{path}: expected one weights file or an index, found {files or 'none'}")
    return open_file(os.path.join(path, files[0]))


def _open_index(index: str):
    folder = os.path.dirname(index)
    check_not_lfs_pointer(index)
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{index}: not a readable safetensors index ({e})") from e
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if absent:
        raise ValueError(f"{index} names shard(s) missing from {folder}: {absent}")
    ckpt = MultiFileCheckpoint(SafetensorsFile(os.path.join(folder, s)) for s in shards)
    misplaced = sorted(
        k for k, s in weight_map.items() if k not in ckpt._where or ckpt._where[k].path != os.path.join(folder, s)
    )
    unlisted = sorted(set(ckpt.keys()) - set(weight_map))
    if misplaced or unlisted:
        raise ValueError(
            f"{index} does not describe its shards: keys not found where listed {misplaced[:10]}, "
            f"keys in no entry {unlisted[:10]}"
        )
    return ckpt


def _open_consolidated(folder: str, groups: set, prefix: str, split_dim):
    candidates = sorted((k for k in groups if k[0] == prefix), key=lambda k: k[2] != "safetensors")
    if not candidates:
        found = sorted({k[0] for k in groups})
        raise ValueError(f"{folder}: no {prefix}.NN-of-MM files (found {found})")
    if len({k[1] for k in candidates}) > 1:
        raise ValueError(f"{folder}: {prefix} files of several world sizes {sorted({k[1] for k in candidates})}")
    _, world, ext = candidates[0]  # prefer safetensors over pth when both are present
    files = [f"{prefix}.{r:02d}-of-{world:02d}.{ext}" for r in range(world)]
    absent = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if absent:
        raise ValueError(f"{folder}: model-parallel shard(s) missing: {absent}")
    readers = [open_file(os.path.join(folder, f)) for f in files]
    if world == 1:
        return readers[0]
    if split_dim is None:
        raise ValueError(f"{folder}: {world} model-parallel shards need a merge table (split_dim) to be combined")
    return ModelParallelCheckpoint(readers, split_dim)


def read_state_dict(path: str, **kwargs) -> dict:
    """Every tensor of a checkpoint (see ``open_checkpoint``) as name -> numpy array."""
    ckpt = open_checkpoint(path, **kwargs)
    return {k: ckpt.read(k) for k in ckpt.keys()}
