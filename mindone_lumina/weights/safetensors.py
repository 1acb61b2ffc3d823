"""The ``.safetensors`` format: a streaming reader (header parsed here, so bfloat16 needs neither torch nor
ml_dtypes) and a streaming writer (header from the shapes first, then one tensor at a time)."""

import json
import os

import numpy as np

from ..atomic import atomic_path, refuse_existing
from .tensors import DTYPES, check_not_lfs_pointer, decode, encode, read_exact

_BY_CODE = {code: name for name, (code, _) in DTYPES.items()}


class SafetensorsFile:
    """One ``.safetensors`` file as a checkpoint reader (``tensors`` module docstring); ``metadata`` is its
    ``__metadata__`` dict."""

    def __init__(self, path: str):
        check_not_lfs_pointer(path)
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"{path} is truncated or not a safetensors file ({size} bytes, header length {n})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries = {}  # key -> (dtype name, shape, begin, end)
        for key, e in header.items():
            try:
                dtype, shape, (begin, end) = _BY_CODE[e["dtype"]], tuple(int(n) for n in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: corrupt or unsupported header entry for {key!r}: {e!r}") from err
            if end - begin != int(np.prod(shape)) * np.dtype(DTYPES[dtype][1]).itemsize:
                raise ValueError(f"{path}: corrupt header, tensor {key!r} {shape} {dtype} spans {end - begin} bytes")
            self._entries[key] = (dtype, shape, begin, end)
        data_end = max((e[3] for e in self._entries.values()), default=0)
        if self._start + data_end > size:
            raise ValueError(
                f"{path} is truncated: its header describes {data_end} bytes of tensor data, the file holds "
                f"{size - self._start}"
            )

    def keys(self):
        return list(self._entries)

    def shape(self, key: str) -> tuple:
        return self._entries[key][1]

    def dtype(self, key: str) -> str:
        return self._entries[key][0]

    def read(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[key]
        return decode(read_exact(self.path, self._start + begin, end - begin, DTYPES[dtype][1]).reshape(shape), dtype)


def write_safetensors(path: str, specs: list, metadata: dict | None = None, force: bool = False, progress=None):
    """Stream ``specs`` (``TensorSpec``) into a safetensors file, atomically; ``progress(nbytes)`` after each."""
    refuse_existing(path, force)
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for s in specs:
        if s.name in header:
            raise ValueError(f"{path}: tensor {s.name!r} written twice")
        header[s.name] = {
            "dtype": DTYPES[s.dtype][0],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for s in specs:
            data = encode(s.fetch(), s.dtype)
            assert data.shape == tuple(s.shape), (s.name, data.shape, s.shape)
            f.write(data.reshape(-1).view(np.uint8))
            if progress is not None:
                progress(s.nbytes)


def verify_safetensors(path: str, specs: list):
    """Re-read a written file and compare every tensor with its source, byte for byte in the written dtype."""
    written = SafetensorsFile(path)
    names = {s.name for s in specs}
    if set(written.keys()) != names:
        raise ValueError(f"{path}: holds keys {sorted(set(written.keys()) ^ names)[:10]} it should not, or lacks them")
    for s in specs:
        if written.dtype(s.name) != s.dtype or tuple(written.shape(s.name)) != tuple(s.shape):
            raise ValueError(
                f"{path}: {s.name} is {written.dtype(s.name)} {written.shape(s.name)}, expected {s.dtype} {s.shape}"
            )
        if not np.array_equal(encode(written.read(s.name), s.dtype), encode(s.fetch(), s.dtype)):
            raise ValueError(f"{path}: {s.name} differs from its source")
