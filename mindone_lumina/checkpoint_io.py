"""Reading and writing checkpoint files one tensor at a time, without torch and without running pickle code.

Every reader has ``keys()``, ``shape(key)``, ``dtype(key)`` and ``read(key)``. ``read`` returns a numpy array in the
stored dtype, except bfloat16 (numpy has none): it is widened exactly to float32 while ``dtype(key)`` still says
``"bfloat16"``, so writing it back as bfloat16 is bit-exact. Tensor bytes are read with ``readinto`` at their file
offset (no mmap), so resident memory holds only the tensor being read.

Formats: ``.safetensors`` (header parsed here), torch zip ``.pth`` / ``.bin`` (restricted unpickler: only the globals
that rebuild tensors are admitted and storages are read lazily), folders holding one file, a sharded
``*.safetensors.index.json``, or the original Lumina-T2X ``consolidated[_ema].NN-of-MM.*`` model-parallel shards.
Models never call this module; loaders, converters and tools do.
"""

import argparse
import collections
import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

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
_BY_CODE = {code: name for name, (code, _) in DTYPES.items()}
FLOATING = ("float64", "float32", "float16", "bfloat16")
CASTS = {"keep": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# ------------------------------------------------------------------------------------------------------------------
# dtype helpers: bfloat16 without ml_dtypes or torch
# ------------------------------------------------------------------------------------------------------------------
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
    return CASTS[cast] if CASTS[cast] and stored in FLOATING else stored


def encode(array: np.ndarray, dtype: str) -> np.ndarray:
    """A C-contiguous little-endian array holding exactly the bytes a file stores for ``array`` as ``dtype``."""
    if dtype == "bfloat16":
        return f32_to_bf16(array)
    return np.ascontiguousarray(array, dtype=np.dtype(DTYPES[dtype][1]).newbyteorder("<"))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical (so -0.0 differs from 0.0 and equal NaNs match)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))
    )


def _decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_to_f32(raw) if dtype == "bfloat16" else raw


# ------------------------------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------------------------------
def check_not_lfs_pointer(path: str):
    """Raise ``ValueError`` if ``path`` is a git-LFS pointer (a ~130-byte text file standing in for the weights)."""
    with open(path, "rb") as f:
        head = f.read(200)
    if head.startswith(LFS_MAGIC):
        size = re.search(rb"size (\d+)", head)
        real = f" of {int(size.group(1)) / 1e9:.2f} GB" if size else ""
        raise ValueError(
            f"{path} is a git-LFS pointer file, not the weights{real}: fetch the real file (git lfs pull, or download "
            "it from the hub) and try again"
        )


def _read_exact(path: str, offset: int, nbytes: int, raw_dtype) -> np.ndarray:
    out = np.empty(nbytes, dtype=np.uint8)
    with open(path, "rb") as f:
        f.seek(offset)
        got = f.readinto(memoryview(out))
    if got != nbytes:
        raise ValueError(f"{path} is truncated: wanted {nbytes} bytes at offset {offset}, got {got}")
    return out.view(np.dtype(raw_dtype).newbyteorder("<"))


class SafetensorsFile:
    """One ``.safetensors`` file: the JSON header is parsed here, so bfloat16 needs neither torch nor ml_dtypes."""

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
        return _decode(_read_exact(self.path, self._start + begin, end - begin, DTYPES[dtype][1]).reshape(shape), dtype)


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
        data = _read_exact(self.path, self._member_offset(t.storage.key) + t.offset * itemsize, span * itemsize, raw)
        strides = tuple(s * itemsize for s in t.stride)
        array = np.lib.stride_tricks.as_strided(data, t.shape, strides) if span else data[:0].reshape(t.shape)
        return _decode(np.ascontiguousarray(array), dtype)

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


class MultiFileCheckpoint:
    """Several files with disjoint keys seen as one mapping (sharded safetensors)."""

    def __init__(self, readers: Iterable):
        self.readers = list(readers)
        self._where = {}
        for r in self.readers:
            for k in r.keys():
                if k in self._where:
                    raise ValueError(f"key {k!r} appears in both {self._where[k].path} and {r.path}")
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
        raise ValueError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    if path.endswith((".pth", ".pt", ".bin")):
        return PthFile(path)
    check_not_lfs_pointer(path)
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
    files = [n for n in names if n.endswith((".safetensors", ".pth", ".pt", ".bin"))]
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


# ------------------------------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: its file name, shape and dtype up front, its value fetched only when written."""

    name: str
    shape: tuple
    dtype: str
    fetch: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(DTYPES[self.dtype][1]).itemsize


def check_writable(path: str, force: bool):
    if os.path.exists(path) and not force:
        raise ValueError(f"{path} already exists; pass force=True (--force) to overwrite it")


def write_safetensors(path: str, specs: list, metadata: dict | None = None, force: bool = False, progress=None):
    """Stream ``specs`` into a safetensors file: the header from shapes first, then one tensor at a time.

    Written to a temporary name in the same folder and renamed at the end, so an interrupted run leaves no partial
    file under ``path``. ``progress(nbytes)`` is called after each tensor.
    """
    check_writable(path, force)
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
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for s in specs:
                data = encode(s.fetch(), s.dtype)
                assert data.shape == tuple(s.shape), (s.name, data.shape, s.shape)
                f.write(data.reshape(-1).view(np.uint8))
                if progress is not None:
                    progress(s.nbytes)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def staged_folder(folder: str):
    """A new temporary folder beside ``folder`` to write into; it becomes ``folder`` (which must be absent or empty)
    only when the block succeeds, and is removed if it raises, so readers never see a half-written folder."""
    if os.path.exists(folder) and os.listdir(folder):
        raise ValueError(f"{folder} exists and is not empty; refusing to overwrite")
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(folder))}-")  # same filesystem
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if os.path.isdir(folder):
            os.rmdir(folder)
        os.replace(tmp, folder)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def write_json(path: str, obj: dict, force: bool = False):
    """Small JSON side files (configs), written atomically like the weights."""
    check_writable(path, force)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


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
