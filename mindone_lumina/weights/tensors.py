"""What every checkpoint reader shares: dtype names and their stored bytes, bfloat16 without ml_dtypes or torch, raw
reads at a file offset, and ``TensorSpec`` (a tensor to be written, read only when written).

Readers (``safetensors.SafetensorsFile``, ``torch_pickle.PthFile``, the folders of ``checkpoints``) all have
``keys()``, ``shape(key)``, ``dtype(key)`` and ``read(key)``. ``read`` returns a numpy array in the stored dtype,
except bfloat16 (numpy has none): it is widened exactly to float32 while ``dtype(key)`` still says ``"bfloat16"``, so
writing it back as bfloat16 is bit-exact. Bytes are read with ``readinto`` at their offset (no mmap), so resident
memory holds only the tensor being read.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..dtypes import SHORT

LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"

# dtype name -> (safetensors code, numpy dtype of the stored bytes)
DTYPES = {
    "float64": ("F64", np.float64),
    "float32": ("F32", np.float32),
    "float16": ("F16", np.float16),
    "bfloat16": ("BF16", np.uint16),  # raw bits; widened to float32 on read
    "int64": ("I64", np.int64),
    "int32": ("I32", np.int32),
    "int16": ("I16", np.int16),
    "int8": ("I8", np.int8),
    "uint8": ("U8", np.uint8),
    "bool": ("BOOL", np.bool_),
}
FLOATING = ("float64", "float32", "float16", "bfloat16")
CASTS = ("keep", *SHORT)  # what a conversion may cast floating tensors to


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact widening: a bfloat16 is the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even like torch; NaN stays a quiet NaN.

    In-place steps keep the temporaries to one uint32 array (memory: about 2.5x the float32 input in all).
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = u >> 16
    r &= 1
    r += 0x7FFF
    r += u  # rounding bias: 0x7FFF plus the lowest kept bit (ties to even)
    r >>= 16
    bits = r.astype(np.uint16)
    del r
    nan = np.isnan(u.view(np.float32))
    if nan.any():
        bits[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return bits


def output_dtype(stored: str, cast: str) -> str:
    """The dtype a tensor is written in: ``cast`` (keep/fp32/fp16/bf16) applies to floating tensors only."""
    if cast not in CASTS:
        raise ValueError(f"unknown dtype {cast!r}: expected one of {list(CASTS)}")
    return SHORT[cast] if cast != "keep" and stored in FLOATING else stored


def encode(array: np.ndarray, dtype: str) -> np.ndarray:
    """A C-contiguous little-endian array holding exactly the bytes a file stores for ``array`` as ``dtype``."""
    if dtype == "bfloat16":
        return f32_to_bf16(array)
    return np.ascontiguousarray(array, dtype=np.dtype(DTYPES[dtype][1]).newbyteorder("<"))


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_to_f32(raw) if dtype == "bfloat16" else raw


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical (so -0.0 differs from 0.0 and equal NaNs match)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))
    )


def check_not_lfs_pointer(path: str):
    """``ValueError`` if ``path`` is a git-LFS pointer (a ~130-byte text file standing in for the weights)."""
    with open(path, "rb") as f:
        head = f.read(200)
    if head.startswith(LFS_MAGIC):
        size = re.search(rb"size (\d+)", head)
        real = f" of {int(size.group(1)) / 1e9:.2f} GB" if size else ""
        raise ValueError(
            f"{path} is a git-LFS pointer file, not the weights{real}: fetch the real file (git lfs pull, or download "
            "it from the hub) and try again"
        )


def read_exact(path: str, offset: int, nbytes: int, raw_dtype) -> np.ndarray:
    """``nbytes`` at ``offset`` as a flat little-endian ``raw_dtype`` array; ``ValueError`` if the file ends first."""
    out = np.empty(nbytes, dtype=np.uint8)
    with open(path, "rb") as f:
        f.seek(offset)
        got = f.readinto(memoryview(out))
    if got != nbytes:
        raise ValueError(f"{path} is truncated: wanted {nbytes} bytes at offset {offset}, got {got}")
    return out.view(np.dtype(raw_dtype).newbyteorder("<"))


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write or load: its name, shape and dtype up front, its value fetched only when needed."""

    name: str
    shape: tuple
    dtype: str
    fetch: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(DTYPES[self.dtype][1]).itemsize


class ArrayCheckpoint:
    """An in-memory name -> array mapping (numpy arrays or MindSpore Tensors) seen as a checkpoint reader."""

    path = "<arrays in memory>"

    def __init__(self, arrays):
        self.arrays = {k: v.asnumpy() if hasattr(v, "asnumpy") else np.asarray(v) for k, v in arrays.items()}

    def keys(self):
        return list(self.arrays)

    def shape(self, key: str) -> tuple:
        return tuple(self.arrays[key].shape)

    def dtype(self, key: str) -> str:
        return self.arrays[key].dtype.name

    def read(self, key: str) -> np.ndarray:
        return self.arrays[key]
