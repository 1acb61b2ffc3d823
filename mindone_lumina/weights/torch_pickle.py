"""Torch zip checkpoints (``torch.save`` since torch 1.6: ``.pth``, ``.pt``, ``.bin``) read without torch and without
running pickle code: a restricted unpickler admits only the globals that rebuild tensors (and ``argparse.Namespace``,
for ``model_args.pth``), and tensors stay lazy until ``read``."""

import argparse
import collections
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np

from .tensors import DTYPES, check_not_lfs_pointer, decode, read_exact

# torch storage class names -> dtype names; the only torch globals a tensor state dict needs besides the rebuilders
_STORAGES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _Storage:
    key: str  # member name under data/ in the zip
    dtype: str
    numel: int


@dataclass(frozen=True)
class _LazyTensor:
    storage: _Storage
    offset: int  # in elements
    shape: tuple
    stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v2 got {type(storage).__name__} instead of a storage")
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    if len(size) != len(stride) or min((storage_offset, *size, *stride)) < 0:
        raise pickle.UnpicklingError(f"invalid tensor layout: offset {storage_offset}, size {size}, stride {stride}")
    return _LazyTensor(storage, int(storage_offset), size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,  # model_args.pth
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only ``_SAFE_GLOBALS``, mapped to local stand-ins; no torch or other code is imported or run."""

    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to unpickle the global {module}.{name}; only tensor state dicts (and argparse.Namespace) "
                "are read, and a pickle naming anything else may run code when loaded"
            )
        return _SAFE_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return _Storage(str(pid[2]), pid[1].dtype, int(pid[4]))


class PthFile:
    """A torch zip checkpoint (``torch.save`` since torch 1.6): ``.pth``, ``.pt``, ``.bin``.

    ``obj`` is the unpickled object with tensors left lazy; for a state dict ``keys``/``read`` expose its tensors.
    """

    def __init__(self, path: str):
        check_not_lfs_pointer(path)
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise ValueError(
                f"{path} is truncated, corrupt, or a legacy (pre torch 1.6, non-zip) pickle, which is not read: {e}"
            ) from e
        names = self._zip.namelist()
        pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"{path}: not a torch checkpoint (no single data.pkl among {names[:5]})")
        self._prefix = pkl[0][: -len("data.pkl")]
        if self._prefix + "byteorder" in names and self._zip.read(self._prefix + "byteorder") != b"little":
            raise ValueError(f"{path}: big-endian torch checkpoints are not supported")
        try:
            with self._zip.open(pkl[0]) as f:
                self.obj = _RestrictedUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: {e}") from e
        except (EOFError, zipfile.BadZipFile, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{path}: corrupt pickle in data.pkl ({type(e).__name__}: {e})") from e
        tensors = self.obj if isinstance(self.obj, dict) else {}
        self._tensors = {k: v for k, v in tensors.items() if isinstance(v, _LazyTensor)}
        if isinstance(self.obj, dict) and len(self._tensors) != len(self.obj):
            others = sorted(str(k) for k, v in self.obj.items() if not isinstance(v, _LazyTensor))
            raise ValueError(f"{path}: expected a flat state dict of tensors, found non-tensor entries {others[:10]}")

    def keys(self):
        return list(self._tensors)

    def shape(self, key: str) -> tuple:
        return self._tensors[key].shape

    def dtype(self, key: str) -> str:
        return self._tensors[key].storage.dtype

    def read(self, key: str) -> np.ndarray:
        t = self._tensors[key]
        dtype, raw = t.storage.dtype, DTYPES[t.storage.dtype][1]
        itemsize = np.dtype(raw).itemsize
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) if all(t.shape) else 0  # elements touched
        if t.offset + span > t.storage.numel:
            raise ValueError(f"{self.path}: tensor {key!r} reaches past the end of its storage")
        data = read_exact(self.path, self._member_offset(t.storage.key) + t.offset * itemsize, span * itemsize, raw)
        strides = tuple(s * itemsize for s in t.stride)
        array = np.lib.stride_tricks.as_strided(data, t.shape, strides) if span else data[:0].reshape(t.shape)
        return decode(np.ascontiguousarray(array), dtype)

    def _member_offset(self, storage_key: str) -> int:
        """Absolute file offset of a stored (uncompressed) zip member, read from its local header."""
        info = self._zip.getinfo(f"{self._prefix}data/{storage_key}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{self.path}: storage {storage_key} is compressed; torch never writes that")
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise ValueError(f"{self.path}: corrupt zip entry for storage {storage_key}")
        return info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")


def read_pickle(path: str):
    """The object in a torch zip file with tensors left lazy, e.g. the ``argparse.Namespace`` of ``model_args.pth``."""
    return PthFile(path).obj
