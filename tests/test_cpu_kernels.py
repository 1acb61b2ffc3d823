"""The compiled CPU kernels (``cpu_kernels.py``: oneDNN convolution, GroupNorm, softmax and the RMSNorm / LayerNorm
with their affine and adaLN modulation as AOT custom ops) against torch: values and gradients, in graph mode and
PyNative, and the build's cache and fallback."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import MODES, rel_err

import mindspore as ms
from mindspore import Tensor, nn

from mindone_lumina import backend, convolution, cpu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not backend.compiled_kernels(), reason="no C++ compiler: the portable path runs")

CONVS = [  # (batch, in, out, height, width, kernel, stride, padding)
    (2, 5, 7, 9, 10, 3, 1, 1),
    (1, 8, 6, 10, 11, 3, 2, 0),
    (2, 4, 3, 8, 9, 1, 1, 0),
    (1, 3, 4, 11, 11, 3, 2, 1),
    (3, 16, 32, 12, 7, 3, 1, 1),
]


class Conv(nn.Cell):
    def __init__(self, stride: int, padding: int):
        super().__init__()
        self.stride, self.padding = stride, padding

    def construct(self, x, weight, bias):
        return convolution.conv2d(x, weight, bias, self.stride, self.padding, kernel="onednn")


class Norm(nn.Cell):
    def __init__(self, groups: int, eps: float, silu: bool = False):
        super().__init__()
        self.groups, self.eps, self.silu = groups, eps, silu

    def construct(self, x, weight, bias):
        return backend.group_norm(x, self.groups, weight, bias, self.eps, compiled=True, silu=self.silu)


class Loss(nn.Cell):
    """sum(f(*inputs) * weights): its gradient is the vector-Jacobian product with ``weights``."""

    def __init__(self, f, weights):
        super().__init__()
        self.f, self.weights = f, Tensor(weights)

    def construct(self, *inputs):
        return (self.f(*inputs) * self.weights).sum()


def run_both(f, inputs, cotangent, mode):
    """f's value and the gradients of all its tensor inputs, in the given MindSpore mode."""
    ms.set_context(mode=MODES[mode])
    tensors = [Tensor(a) for a in inputs]
    value = f(*tensors).asnumpy()
    grads = ms.grad(Loss(f, cotangent), grad_position=tuple(range(len(inputs))))(*tensors)
    grads = grads if isinstance(grads, tuple) else (grads,)  # one input: the gradient itself
    return value, [g.asnumpy() for g in grads]


def assert_matches(value, grads, ref, ref_grads, what=None):
    """Value within 1e-6 and every gradient within 1e-5 of torch's (relative); where torch's gradient is zeros (an
    input the function does not read), exactly zeros."""
    assert rel_err(value, ref) < 1e-6, what
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert (not g.any()) if not r.any() else rel_err(g, r) < 1e-5, (what, i)


def torch_both(f, inputs, cotangent):
    tensors = [torch.tensor(a, requires_grad=True) for a in inputs]
    value = f(*tensors)
    value.backward(torch.tensor(cotangent))
    return value.detach().numpy(), [t.grad.numpy() for t in tensors]


@pytest.mark.parametrize("case", CONVS, ids=[f"conv{i}" for i in range(len(CONVS))])
@pytest.mark.parametrize("mode", list(MODES))
def test_conv_matches_torch(case, mode):
    b, c, o, h, w, k, s, p = case
    rng = np.random.default_rng(sum(case))
    x, weight = rng.standard_normal((b, c, h, w), np.float32), rng.standard_normal((o, c, k, k), np.float32)
    bias = rng.standard_normal(o, dtype=np.float32)
    cotangent = rng.standard_normal((b, o, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1), np.float32)
    ref, ref_grads = torch_both(lambda *a: torch.nn.functional.conv2d(*a, stride=s, padding=p), [x, weight, bias],
                                cotangent)  # fmt: skip
    value, grads = run_both(Conv(s, p), [x, weight, bias], cotangent, mode)
    assert value.shape == ref.shape
    assert rel_err(value, ref) < 1e-6
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-6


def test_conv_half_precision_runs_in_float32():
    rng = np.random.default_rng(0)
    x, weight = rng.standard_normal((1, 4, 6, 6), np.float32), rng.standard_normal((5, 4, 3, 3), np.float32)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    y = cpu_kernels.conv2d(Tensor(x, ms.float16), Tensor(weight, ms.float16), Tensor(np.zeros(5), ms.float16), 1, 1)
    assert y.dtype == ms.float16
    ref = torch.nn.functional.conv2d(torch.tensor(x).half().float(), torch.tensor(weight).half().float(), padding=1)
    assert rel_err(y.astype(ms.float32).asnumpy(), ref.numpy()) < 1e-3  # the fp16 rounding of the output


NORMS = [  # (shape, groups, eps)
    ((2, 8, 5, 6), 4, 1e-6),
    ((1, 64, 16, 16), 32, 1e-6),
    ((3, 6, 7), 3, 1e-5),
    ((2, 4, 3, 50, 50), 2, 1e-6),  # groups longer than one summation block
]


@pytest.mark.parametrize("case", NORMS, ids=[f"norm{i}" for i in range(len(NORMS))])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("mode", list(MODES))
def test_group_norm_matches_torch(case, silu, mode):
    """GroupNorm, and GroupNorm followed by SiLU in the same kernel (the VAE's form), values and gradients."""
    shape, groups, eps = case
    rng = np.random.default_rng(len(shape) + groups)
    x = (rng.standard_normal(shape, np.float32) * 3 + 2).astype(np.float32)  # a mean and scale to remove
    weight, bias = rng.standard_normal(shape[1], np.float32), rng.standard_normal(shape[1], np.float32)
    cotangent = rng.standard_normal(shape, np.float32)
    act = torch.nn.functional.silu if silu else (lambda y: y)
    ref, ref_grads = torch_both(lambda *a: act(torch.nn.functional.group_norm(a[0], groups, a[1], a[2], eps)),
                                [x, weight, bias], cotangent)  # fmt: skip
    assert_matches(*run_both(Norm(groups, eps, silu), [x, weight, bias], cotangent, mode), ref, ref_grads)


class Softmax(nn.Cell):
    def construct(self, x):
        return cpu_kernels.softmax(x)


SOFTMAXES = [  # (shape, scale of the scores, masked columns)
    ((2, 3, 5, 17), 1.0, 0),  # rows shorter than the kernel's 16 lanes plus a tail
    ((1, 2, 4, 300), 8.0, 37),  # large scores; the last keys masked with the attention's -1e30
    ((7,), 30.0, 0),
    ((3, 40), 1.0, 40),  # every key masked: uniform, as torch's softmax of equal scores
]


@pytest.mark.parametrize("case", SOFTMAXES, ids=[f"softmax{i}" for i in range(len(SOFTMAXES))])
@pytest.mark.parametrize("mode", list(MODES))
def test_softmax_matches_torch(case, mode):
    shape, scale, masked = case
    rng = np.random.default_rng(len(shape) + masked)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if masked:
        x[..., -masked:] = backend._MASKED
    cotangent = rng.standard_normal(shape, np.float32)
    ref, (ref_grad,) = torch_both(lambda a: torch.softmax(a, -1), [x], cotangent)
    value, (grad,) = run_both(Softmax(), [x], cotangent, mode)
    assert rel_err(value, ref) < 1e-6
    assert rel_err(grad, ref_grad) < 1e-6
    if masked and masked < shape[-1]:
        assert not value[..., -masked:].any()  # exactly 0, as torch's -inf mask gives


class Attention(nn.Cell):
    def __init__(self, key_mask, compiled: bool):
        super().__init__()
        self.key_mask, self.compiled_kernel = Tensor(key_mask), compiled

    def construct(self, q, k, v):
        return backend.attention(q, k, v, self.key_mask, 0.25, compiled=self.compiled_kernel)


@pytest.mark.parametrize("mode", list(MODES))
def test_attention_on_the_compiled_softmax_matches_torch(mode):
    """backend.attention with a key mask and grouped kv heads, on both softmax paths, against torch's SDPA."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, n, heads, 16), np.float32) for n, heads in ((9, 4), (11, 2), (11, 2)))
    key_mask = np.ones((2, 11), bool)
    key_mask[1, 6:] = False
    cotangent = rng.standard_normal((2, 9, 4, 16), np.float32)

    def sdpa(q, k, v):  # (B, L, N, D) in and out, kv heads repeated, the mask as the project's
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        mask = torch.tensor(key_mask)[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=0.25).transpose(1, 2)

    ref, ref_grads = torch_both(sdpa, [q, k, v], cotangent)
    for compiled in (True, False):
        assert_matches(*run_both(Attention(key_mask, compiled), [q, k, v], cotangent, mode), ref, ref_grads, compiled)


class RowNorm(nn.Cell):
    """backend's LayerNorm (with weight and bias) or LLaMA RMSNorm (with weight), on either normalisation path."""

    def __init__(self, centred: bool, compiled: bool):
        super().__init__()
        self.centred, self.compiled_kernel = centred, compiled

    def construct(self, x, weight, bias):
        if self.centred:
            return backend.layer_norm(x, weight, bias, 1e-5, compiled=self.compiled_kernel)
        return backend.rms_norm(x, weight, 1e-6, compiled=self.compiled_kernel) + bias


def torch_row_norm(centred: bool):
    def norm(x, weight, bias):
        if centred:
            return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, 1e-5)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight + bias

    return norm


@pytest.mark.parametrize("shape", [(2, 5, 24), (3, 7), (2, 2, 3, 130)], ids=["tokens", "rows", "wide"])
@pytest.mark.parametrize("centred", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("mode", list(MODES))
def test_row_norms_match_torch(shape, centred, mode):
    """LayerNorm and RMSNorm on the compiled normalisation and on the portable ops, values and the gradients of x,
    weight and bias."""
    rng = np.random.default_rng(shape[-1])
    x = (rng.standard_normal(shape, np.float32) * 2 + 0.5).astype(np.float32)
    weight, bias = rng.standard_normal(shape[-1], np.float32), rng.standard_normal(shape[-1], np.float32)
    cotangent = rng.standard_normal(shape, np.float32)
    ref, ref_grads = torch_both(torch_row_norm(centred), [x, weight, bias], cotangent)
    for compiled in (True, False):
        value, grads = run_both(RowNorm(centred, compiled), [x, weight, bias], cotangent, mode)
        assert_matches(value, grads, ref, ref_grads, compiled)


class ModulatedNorm(nn.Cell):
    """A DiT's adaLN norm: RMSNorm (weight) or LayerNorm (no affine), then ``* scale + shift`` per sample."""

    def __init__(self, centred: bool, compiled: bool, shifted: bool):
        super().__init__()
        self.centred, self.compiled_kernel, self.shifted = centred, compiled, shifted

    def construct(self, x, weight, scale, shift):
        shift = shift if self.shifted else None
        if self.centred:
            return backend.layer_norm(x, None, None, 1e-6, compiled=self.compiled_kernel, scale=scale, shift=shift)
        return backend.rms_norm(x, weight, 1e-5, compiled=self.compiled_kernel, scale=scale, shift=shift)


def torch_modulated_norm(centred: bool, shifted: bool):
    def norm(x, weight, scale, shift):
        if centred:
            y = torch.nn.functional.layer_norm(x, x.shape[-1:], None, None, 1e-6) + 0 * weight.sum()
        else:
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight
        y = y * scale[:, None]
        return y + shift[:, None] if shifted else y + 0 * shift.sum()  # every input in the graph: its gradient is 0

    return norm


@pytest.mark.parametrize("shape", [(2, 5, 24), (3, 1, 130), (1, 33, 16)], ids=["tokens", "one-token", "one-sample"])
@pytest.mark.parametrize("kind", ["rms", "rms-shift", "layer-shift"])
@pytest.mark.parametrize("mode", list(MODES))
def test_modulated_norms_match_torch(shape, kind, mode):
    """The adaLN forms of the DiTs (``norm(x) * scale + shift`` with a (B, D) scale and shift per sample) on the
    compiled kernel, which takes the modulation into its one pass, and on the portable ops: values and the gradients
    of x, weight, scale and shift."""
    centred, shifted = kind.startswith("layer"), kind.endswith("shift")
    rng = np.random.default_rng(shape[-1] + len(kind))
    b, _, d = shape
    x = (rng.standard_normal(shape, np.float32) * 2 + 0.5).astype(np.float32)
    weight = rng.standard_normal(d, np.float32)
    scale, shift = (rng.standard_normal((b, d), np.float32) for _ in range(2))
    cotangent = rng.standard_normal(shape, np.float32)
    ref, ref_grads = torch_both(torch_modulated_norm(centred, shifted), [x, weight, scale, shift], cotangent)
    for compiled in (True, False):
        value, grads = run_both(ModulatedNorm(centred, compiled, shifted), [x, weight, scale, shift], cotangent, mode)
        assert_matches(value, grads, ref, ref_grads, compiled)  # gradients of x, weight, scale, shift in that order


def fresh(code: str, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True)


PROBE = """
from mindone_lumina import backend, convolution
backend.set_device("CPU")
print(backend.compiled_kernels(), convolution.conv_kernel())
"""


def test_build_is_cached_and_falls_back(tmp_path):
    cache = str(tmp_path / "cache")
    built = fresh(PROBE, MINDONE_LUMINA_CACHE=cache)
    assert built.returncode == 0 and built.stdout.split() == ["True", "onednn"], built.stderr[-2000:]
    libraries = os.listdir(cache)
    assert len(libraries) == 1 and libraries[0].endswith(".so")  # no partial file left behind
    library = os.path.join(cache, libraries[0])
    stamp = os.stat(library).st_mtime_ns
    again = fresh(PROBE, MINDONE_LUMINA_CACHE=cache)
    assert again.stdout.split() == ["True", "onednn"] and os.stat(library).st_mtime_ns == stamp  # reused, not rebuilt

    # a compiler that fails: a clear message, and the portable path (the cache is empty, so it must build)
    failed = fresh(PROBE, MINDONE_LUMINA_CACHE=str(tmp_path / "other"), CXX="false")
    assert failed.returncode == 0 and failed.stdout.split()[0] == "False"
    assert "building the CPU kernels failed" in failed.stderr
    assert not os.listdir(tmp_path / "other")
    off = fresh(PROBE, MINDONE_LUMINA_CACHE=cache, MINDONE_LUMINA_CPU_KERNELS="0")
    assert off.stdout.split()[0] == "False" and off.stdout.split()[1] in ("framework", "taps")


def test_conv_kernel_setting_is_checked():
    bad = fresh(PROBE, MINDONE_LUMINA_CONV="winograd")
    assert bad.returncode != 0
    assert "MINDONE_LUMINA_CONV='winograd': expected one of onednn, framework, taps" in bad.stderr
    missing = fresh(PROBE, MINDONE_LUMINA_CONV="onednn", MINDONE_LUMINA_CPU_KERNELS="0")
    assert missing.returncode != 0 and "MINDONE_LUMINA_CONV=onednn: the CPU kernels are unavailable" in missing.stderr
    assert fresh(PROBE, MINDONE_LUMINA_CONV="taps").stdout.split() == ["True", "taps"]
