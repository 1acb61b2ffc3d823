"""CPU kernels the project compiles itself: MindSpore AOT custom ops for the VAE's convolution and GroupNorm (with its
SiLU), the attention's softmax and the RMSNorm / LayerNorm with their affine and adaLN modulation.

MindSpore 2.10's CPU ``Conv2D`` hands oneDNN plain NCHW/OIHW memory, which on an AVX-512 processor sends a 3x3 conv to
oneDNN's reference kernel (``convolution.py``), and its CPU ``GroupNorm`` with ``GroupNormGrad`` took 18x
torch's time (a VAE training shape, benchmarks/README). ``csrc/onednn_conv.cc`` calls the same oneDNN (MindSpore's
own ``libdnnl.so.3``) through its C API with the layouts left to oneDNN, as torch does, for the forward pass and both
gradients; ``csrc/group_norm.cc`` is a GroupNorm, optionally with the SiLU after it, and its gradient;
``csrc/softmax.cc`` a last-axis softmax and its gradient, one pass each (MindSpore's gradient is four kernels, its
last-axis ReduceSum slow on attention scores); ``csrc/row_norm.cc`` RMSNorm and LayerNorm with weight, per-sample
scale and shift, one pass each way where the portable path is a dozen kernels forward and twice that backward; all
run on one threadpool (``csrc/threadpool.h``).

The sources are compiled at first use with the system's C++ compiler (``$CXX`` or ``g++``) into a cache folder
(``$MINDONE_LUMINA_CACHE``, else ``$XDG_CACHE_HOME/mindone_lumina``, else ``~/.cache/mindone_lumina``), under a name
hashed from the sources, the compiler and the MindSpore version. Where that cannot be done (no compiler, no
``libdnnl.so.3``, a failed build) ``available()`` is False and the backend keeps its portable path.
"""

import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mindspore as ms
from mindspore import Tensor, mint, ops

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = ("onednn_conv.cc", "group_norm.cc", "softmax.cc", "row_norm.cc")
_HEADERS = ("threadpool.h", "rows.h")
_ops = {}  # name -> ops.Custom, filled by ``available()``


def _cache_dir() -> Path:
    if os.environ.get("MINDONE_LUMINA_CACHE"):
        return Path(os.environ["MINDONE_LUMINA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mindone_lumina"


def _build() -> Path | None:
    """The compiled library (built now if it is not cached), or None; a failed build prints why on stderr."""
    lib_dir = Path(ms.__file__).parent / "lib"
    compiler = shutil.which(os.environ.get("CXX") or "g++")
    if not (lib_dir / "libdnnl.so.3").exists() or compiler is None:
        return None  # another MindSpore build, or no compiler: the portable path is the design, nothing to report
    digest = hashlib.sha256(f"{compiler} {ms.__version__}".encode())
    for name in _SOURCES + _HEADERS:
        digest.update((_CSRC / name).read_bytes())
    target = _cache_dir() / f"cpu_kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")  # renamed when complete: builds may race
    # no fused multiply-adds: the row norm's products and sums must round as the portable path's separate kernels
    command = [compiler, "-O3", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", "-pthread", "-o", str(partial)]
    command += [str(_CSRC / name) for name in _SOURCES] + [f"-L{lib_dir}", "-l:libdnnl.so.3", f"-Wl,-rpath,{lib_dir}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        print(f"mindone_lumina: building the CPU kernels failed; the portable ops run instead:\n{done.stderr[-2000:]}",
              file=sys.stderr)  # fmt: skip
        return None
    os.replace(partial, target)
    return target


def _conv_shape(x, w, b, geometry):
    stride, padding = geometry[0], geometry[1] - 1
    return (x[0], w[0], (x[2] + 2 * padding - w[2]) // stride + 1, (x[3] + 2 * padding - w[3]) // stride + 1)


def _float32(*shapes):
    return ms.float32


def _custom(library: Path, name: str, out_shape, outputs: int = 1, bprop=None):
    dtype = _float32 if outputs == 1 else (lambda *shapes: (ms.float32,) * outputs)
    return ops.Custom(f"{library}:{name}", out_shape=out_shape, out_dtype=dtype, func_type="aot", bprop=bprop)


@functools.cache
def available() -> bool:
    """Whether the custom ops are built and loaded (decided once per process; they are CPU kernels)."""
    library = _build()
    if library is None:
        return False
    conv_data = _custom(library, "ConvBackwardData", lambda dy, w, x, g: x)
    conv_weights = _custom(library, "ConvBackwardWeights", lambda dy, x, w, g: (w, w[:1]), outputs=2)

    def conv_bprop(x, w, b, geometry, out, dout):
        dw, db = conv_weights(dout, x, w, geometry)
        return conv_data(dout, w, x, geometry), dw, db, ops.zeros_like(geometry)

    norm_backward = _custom(library, "GroupNormBackward", lambda dy, x, w, b, m, r, c: (x, w, w), outputs=3)

    def norm_bprop(x, w, b, conf, out, dout):
        dx, dw, db = norm_backward(dout[0], x, w, b, out[1], out[2], conf)
        return dx, dw, db, ops.zeros_like(conf)

    softmax_backward = _custom(library, "SoftmaxBackward", lambda dy, y: y)

    def softmax_bprop(x, out, dout):
        return (softmax_backward(dout, out),)

    row_norm_backward = _custom(library, "RowNormBackward", lambda dy, x, w, s, c, r, conf: (x, w, s, c), outputs=4)

    def row_norm_bprop(x, w, s, c, conf, out, dout):  # out: (y, rstd); nothing downstream reads rstd
        return (*row_norm_backward(dout[0], x, w, s, c, out[1], conf), ops.zeros_like(conf))

    _ops["row_norm"] = _custom(library, "RowNormForward", lambda x, w, s, c, conf: (x, x[:-1]), 2, row_norm_bprop)
    _ops["conv"] = _custom(library, "ConvForward", _conv_shape, bprop=conv_bprop)
    _ops["softmax"] = _custom(library, "SoftmaxForward", lambda x: x, bprop=softmax_bprop)
    stats = lambda x, w, b, conf: (x, (x[0], conf[0]), (x[0], conf[0]))  # noqa: E731
    _ops["group_norm"] = _custom(library, "GroupNormForward", stats, outputs=3, bprop=norm_bprop)
    return True


def conv2d(x, weight, bias, stride: int, padding: int):
    """torch ``conv2d`` (NCHW x OIHW + (O,), zero padding on all sides), computed in fp32 and returned in x's dtype.
    ``available()`` must have returned True (outside graph code).

    The op reads (stride, padding) from the shape of a small zero tensor, (stride, padding + 1).
    """
    geometry = mint.zeros((stride, padding + 1), dtype=ms.float32)
    y = _ops["conv"](x.astype(ms.float32), weight.astype(ms.float32), bias.astype(ms.float32), geometry)
    return y if x.dtype == ms.float32 else y.astype(x.dtype)  # (B, O, Ho, Wo)


def group_norm(x, groups: int, weight, bias, eps: float, silu: bool = False):
    """torch ``group_norm`` of float32 (B, C, *spatial) x with float32 weight and bias (C,), then SiLU if ``silu``.
    ``available()`` must have returned True. The op reads the group count from the shape of its (groups, 2) conf
    tensor, eps and the SiLU switch from its first row (a graph constant)."""
    conf = Tensor([[eps, float(silu)]] + [[0.0, 0.0]] * (groups - 1), ms.float32)
    return _ops["group_norm"](x, weight, bias, conf)[0]


def softmax(x):
    """Softmax over the last axis of a float32 tensor of any rank; ``available()`` must have returned True."""
    return _ops["softmax"](x)


def row_norm(x, eps: float, centred: bool, weight=None, scale=None, shift=None):
    """``((norm(x) * weight) * scale) + shift`` of float32 x over its last axis (n), each factor optional: ``norm`` is
    LayerNorm's ``(x - mean) / sqrt(var + eps)`` when ``centred``, else RMSNorm's ``x / sqrt(mean(x^2) + eps)``;
    ``weight`` (n,), ``scale`` and ``shift`` (G, n), one row per group of x's rows ((1, n): all rows; (B, n): each
    sample of a (B, L, n) x), all float32. ``available()`` must have returned True."""
    # a graph constant: eps and which factors are present; a missing factor's input is the conf itself, read nowhere
    conf = Tensor([eps, centred, weight is not None, scale is not None, shift is not None], ms.float32)
    factors = [
        conf if f is None else f if f.dtype == ms.float32 else f.astype(ms.float32) for f in (weight, scale, shift)
    ]
    return _ops["row_norm"](x, *factors, conf)[0]
