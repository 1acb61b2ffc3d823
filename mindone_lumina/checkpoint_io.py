"""Reading checkpoint files lazily, one tensor at a time. Models never call this; loaders and tools do."""

import json
import os

import numpy as np
from safetensors import safe_open


class SafetensorsCheckpoint:
    """One or more ``.safetensors`` files seen as one mapping (keys, shapes, lazy reads)."""

    def __init__(self, files):
        self.files = list(files)
        self._where = {}
        for f in self.files:
            with safe_open(f, framework="numpy") as h:
                for k in h.keys():
                    if k in self._where:
                        raise ValueError(f"key {k!r} appears in both {self._where[k]} and {f}")
                    self._where[k] = f

    def keys(self):
        return list(self._where)

    def read(self, key: str) -> np.ndarray:
        with safe_open(self._where[key], framework="numpy") as h:
            return h.get_tensor(key)


def open_checkpoint(path: str) -> SafetensorsCheckpoint:
    """A ``.safetensors`` file, or a folder holding one file or a ``*.safetensors.index.json`` with its shards."""
    if os.path.isdir(path):
        indexes = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors.index.json")]
        if indexes:
            with open(os.path.join(path, indexes[0])) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return SafetensorsCheckpoint(os.path.join(path, s) for s in shards)
        files = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
        if len(files) != 1:
            raise ValueError(f"{path}: expected one .safetensors file or an index, found {files or 'none'}")
        return SafetensorsCheckpoint([os.path.join(path, files[0])])
    if not os.path.exists(path):
        raise ValueError(f"checkpoint not found: {path}")
    return SafetensorsCheckpoint([path])


def read_state_dict(path: str) -> dict:
    ckpt = open_checkpoint(path)
    return {k: ckpt.read(k) for k in ckpt.keys()}
