"""Convolutions on every device: which kernel a process uses (``conv_kernel``), MindSpore's oneDNN instruction-set cap
for convolution-heavy processes (``favour_convolutions``), and ``conv2d`` / ``pad2d`` on the chosen kernel.

MindSpore's CPU Conv2D is oneDNN (mindspore/lib/libdnnl.so.3) on plain NCHW activations and OIHW weights. Where oneDNN
may use AVX-512, it gives a 3x3 conv to `jit_uni_ncsp`, which reorders the activations to NHWC and nests the first NHWC
implementation that accepts plain OIHW weights: its reference kernel (about 1 GFLOP/s; `ONEDNN_VERBOSE=1` prints
`jit_uni_ncsp:conv+ref:any`). Below AVX-512 oneDNN runs `gemm:jit` (im2col + sgemm, 150-240 GFLOP/s measured), but its
matmuls lose a third of their speed (benchmarks/README, "Convolution on oneDNN's gemm kernel"). So on CPU the
convolutions run, in order of preference: custom ops that call the same oneDNN with the layouts left to it, as torch
does (``cpu_kernels.py``, built at first use; torch's speed), MindSpore's kernel where oneDNN runs below AVX-512,
and one matmul per kernel tap. ``MINDONE_LUMINA_CONV`` = onednn | framework | taps chooses one by hand. The device
and capability checks are ``backend.py``'s.
"""

import ctypes
import functools
import os

import mindspore as ms
from mindspore import mint, ops

from . import cpu_kernels
from .backend import compiled_kernels, is_cpu, use_fused_kernels

_ONEDNN_AVX512_CORE = 0x27  # dnnl_cpu_isa_avx512_core; every AVX-512 level of dnnl_cpu_isa_t has all of these bits
_ONEDNN_AVX2 = 0x7  # dnnl_cpu_isa_avx2
_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
CONV_KERNELS = ("onednn", "framework", "taps")


@functools.cache
def _onednn():
    """MindSpore's oneDNN library, or None (another MindSpore build; the caller keeps the portable path); loaded once,
    as every conv Cell asks ``conv_kernel()`` at construction."""
    try:
        return ctypes.CDLL(os.path.join(os.path.dirname(ms.__file__), "lib", "libdnnl.so.3"))
    except OSError:
        return None


def native_conv() -> bool:
    """Whether MindSpore's own convolution kernel is fast here: on Ascend, and on CPU where oneDNN runs below AVX-512.

    Reading oneDNN's instruction set fixes it for the process (``favour_convolutions`` cannot change it afterwards),
    so ask after the process has chosen.
    """
    if use_fused_kernels():
        return True
    if not is_cpu():
        return False
    lib = _onednn()
    return lib is not None and (lib.dnnl_get_effective_cpu_isa() & _ONEDNN_AVX512_CORE) != _ONEDNN_AVX512_CORE


def _chosen_conv() -> str:
    """``MINDONE_LUMINA_CONV``, checked ("" when unset); "onednn" fails where the compiled kernels are unavailable.
    Does not read oneDNN's instruction set, so ``favour_convolutions`` can ask before capping it."""
    chosen = os.environ.get("MINDONE_LUMINA_CONV", "")
    if chosen and chosen not in CONV_KERNELS:
        raise ValueError(f"MINDONE_LUMINA_CONV={chosen!r}: expected one of {', '.join(CONV_KERNELS)}")
    if chosen == "onednn" and not compiled_kernels():
        raise ValueError("MINDONE_LUMINA_CONV=onednn: the CPU kernels are unavailable (see compiled_kernels)")
    return chosen


def conv_kernel() -> str:
    """The convolution kernel of ``conv2d`` for this process: "framework" (MindSpore's ``Conv2D``: on Ascend, or on CPU
    where it is fast), "onednn" (the custom ops of ``cpu_kernels.py``) or "taps" (one matmul per kernel tap).

    ``MINDONE_LUMINA_CONV`` overrides the CPU choice (``_chosen_conv``).
    """
    if use_fused_kernels() or not is_cpu():
        return "framework" if native_conv() else "taps"
    chosen = _chosen_conv()
    if chosen:
        return chosen
    if compiled_kernels():
        return "onednn"
    return "framework" if native_conv() else "taps"


def favour_convolutions() -> str:
    """For a process whose work is mostly convolution (VAE training, encoding, decoding) and where the oneDNN custom
    ops are unavailable: on CPU, cap oneDNN at AVX2 so that convolutions run on the framework kernel; matmuls then run
    about a third slower. (The custom ops are fastest on AVX-512, so with them nothing is capped.)

    Call after ``ms.set_device`` and before the first MindSpore op (``set_device(..., convolutions=True)`` does).
    Leaves an ``ONEDNN_MAX_CPU_ISA`` set by the user alone, and cannot act once oneDNN has run. Returns
    ``conv_kernel()``.
    """
    chosen = _chosen_conv() if is_cpu() else ""  # not conv_kernel(): reading the ISA would fix it
    wanted = is_cpu() and chosen != "taps" and (chosen == "framework" or not compiled_kernels())
    lib = _onednn() if wanted else None
    if lib is not None and not any(os.environ.get(v) for v in _ISA_VARIABLES):
        lib.dnnl_set_max_cpu_isa(_ONEDNN_AVX2)  # status 2 (invalid arguments) once oneDNN has run: nothing changes
    return conv_kernel()


def conv2d(x, weight, bias, stride: int = 1, padding: int = 0, kernel: str = "taps"):
    """torch ``conv2d`` (NCHW, zero padding on all sides, no groups or dilation).

    With ``kernel="taps"`` it is a sum of one matmul per kernel tap (see the section comment for why): each tap reads a
    contiguous slice of the image flattened over rows (see ``_conv2d_same``); other strides and paddings first split
    the padded image into ``stride * stride`` phase images. Taps are summed in fp32, as a half-precision conv
    accumulates (MindSpore's CPU kernel computes half precision in fp32 too).

    Args:
        x: (B, C, H, W).
        weight: (O, C, kh, kw); bias: (O,).
        stride, padding: Python ints (graph constants).
        kernel: one of ``CONV_KERNELS``, as ``conv_kernel()`` chose (a graph constant).

    Returns:
        (B, O, Ho, Wo) with Ho = (H + 2 padding - kh) // stride + 1, likewise Wo.
    """
    if kernel == "framework":
        return ops.conv2d(x, weight, bias, stride=stride, pad_mode="pad", padding=padding)
    if kernel == "onednn":
        return cpu_kernels.conv2d(x, weight, bias, stride, padding)
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    s, p = stride, padding
    if kh == kw == s == 1 and p == 0:
        return _bias_add(mint.matmul(weight.reshape(o, c), x.reshape(b, c, h * w)), bias).reshape(b, o, h, w)
    if kh == kw and kh % 2 and s == 1 and p == kh // 2:
        return _conv2d_same(x, weight, bias)
    ho, wo = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
    hq, wq = ho + (kh - 1) // s + 1, wo + (kw - 1) // s  # phase image size; the spare row keeps every tap in range
    assert s * hq >= h + p and s * wq >= w + p, (x.shape, weight.shape, stride, padding)
    x = pad2d(x, p, s * wq - w - p, p, s * hq - h - p)  # (B, C, s*hq, s*wq)
    x = mint.permute(x.reshape(b, c, hq, s, wq, s), (0, 3, 5, 1, 2, 4)).reshape(b, s * s * c, hq * wq)  # phases
    taps = _taps(weight)
    out = None
    for i in range(kh):
        for j in range(kw):
            phase, start = (i % s) * s + j % s, (i // s) * wq + j // s
            y = mint.matmul(taps[i * kw + j], x[:, phase * c : (phase + 1) * c, start : start + ho * wq])
            y = y if y.dtype == ms.float32 else y.astype(ms.float32)
            out = y if out is None else out + y  # (B, O, ho*wq)
    out = _bias_add(out, bias).astype(x.dtype)
    # each phase row carries wq - wo columns past the image edge; crop them
    return out.reshape(b, o, ho, wq)[:, :, :, :wo]  # (B, O, Ho, Wo)


def pad2d(x, left: int, right: int, top: int, bottom: int):
    """Zero padding of the last two axes of (B, C, H, W) by concatenation.

    Neither framework pad is usable on CPU: mint's has no CPU kernel, and a graph holding ``ops.pad`` (PadV3) and an
    optimizer update hangs in MindSpore 2.10's CPU runtime on its 18th run (measured: a matmul, ``ops.pad`` and
    ``nn.AdamWeightDecay``, 16x16 images; 26th at 24x24), which stopped VAE training at step 18. Concatenation does
    not, and gives the same values and gradients.
    """
    b, c, h, w = x.shape
    if left or right:
        parts = [mint.zeros((b, c, h, left), dtype=x.dtype)] if left else []
        parts += [x] + ([mint.zeros((b, c, h, right), dtype=x.dtype)] if right else [])
        x = mint.cat(parts, dim=3)
        w += left + right
    if top or bottom:
        parts = [mint.zeros((b, c, top, w), dtype=x.dtype)] if top else []
        parts += [x] + ([mint.zeros((b, c, bottom, w), dtype=x.dtype)] if bottom else [])
        x = mint.cat(parts, dim=2)
    return x


def _conv2d_same(x, weight, bias):
    """Stride-1 conv with a square odd kernel k and padding k // 2, on the image flattened over rows.

    With p = k // 2 zeros added before and after the flat image (plus p rows' worth), tap (i, j) is the contiguous
    slice starting at i * W + j. A tap with column offset d = j - p reads the neighbouring row at the left/right image
    edge instead of the zero padding, so the partial sum of each column offset is masked on those |d| columns.
    """
    b, c, h, w = x.shape
    o, _, k, _ = weight.shape
    p = k // 2
    edge = mint.zeros((b, c, p * w + p), dtype=x.dtype)
    flat = mint.cat([edge, x.reshape(b, c, h * w), edge], dim=2)  # (B, C, (H + 2p) W + 2p)
    taps = _taps(weight)
    out = None
    for j in range(k):
        part = None
        for i in range(k):
            y = mint.matmul(taps[i * k + j], flat[:, :, i * w + j : i * w + j + h * w])  # (B, O, H*W)
            y = y if y.dtype == ms.float32 else y.astype(ms.float32)
            part = y if part is None else part + y
        d = j - p
        if d:
            keep, drop = mint.ones((w - abs(d),), dtype=ms.float32), mint.zeros((abs(d),), dtype=ms.float32)
            row = mint.cat([drop, keep] if d < 0 else [keep, drop])  # (W,), 0 where column + d is off the image
            # full-shape mask: a broadcasting multiply would pin its output in graph mode (see _bias_add)
            part = part * mint.broadcast_to(row.reshape(1, 1, 1, w), (b, o, h, w)).reshape(b, o, h * w)
        out = part if out is None else out + part
    return _bias_add(out, bias).astype(x.dtype).reshape(b, o, h, w)  # (B, O, H, W)


def _taps(weight):
    """(O, C, kh, kw) -> kh * kw matrices (O, C) in row-major tap order; one split, as indexing is slow on CPU.

    ``ops.transpose``, not ``mint.permute``: with the view op, MindSpore 2.10 graph mode returned the weight gradient
    of one conv for another conv whose weight had the same shape (measured on two chained 3x3 convs; PyNative was
    right), so a VAE trained in graph mode got wrong gradients.
    """
    o, c, kh, kw = weight.shape
    return mint.split(ops.transpose(weight, (2, 3, 0, 1)).reshape(kh * kw * o, c), o, dim=0)


def _bias_add(x, bias):
    """(B, O, N) + (O,) in x's dtype. BiasAdd rather than a broadcasting add: in CPU graph mode the output of a
    broadcasting binary op with a parameter operand is never reused, which multiplied the VAE's peak memory."""
    return ops.bias_add(x, bias.astype(x.dtype))
