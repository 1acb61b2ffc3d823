"""Which MindSpore CPU kernels are slow, and why: matmul forms and convolution against torch on the same shapes.

    python benchmarks/probe_cpu_kernels.py [--repeats 3]

Graph mode, fp32, 10 (matmul) or 9 (conv taps) products per graph, each on a differently scaled input so that the
compiler cannot merge them; the best of ``--repeats`` runs (one run of MindSpore's Conv2D, which can take seconds).
Shapes are the project's: a Next-DiT FFN linear (4,096 tokens x 768 -> 3,072), attention products (12 heads x 1,024
tokens x 64) and a VAE 3x3 conv (128 -> 128 channels at 128² px). MindSpore runs twice, each time in a fresh process:
as oneDNN chooses, and capped at AVX2 (``ONEDNN_MAX_CPU_ISA``, what ``convolution.favour_convolutions`` does without the
compiled kernels), where its Conv2D leaves oneDNN's reference path. The compiled kernels (``cpu_kernels``: the conv on
oneDNN's blocked layouts, a GroupNorm) run beside MindSpore's own, with the VAE's GroupNorm at 256² px. Then
oneDNN's own report (``ONEDNN_VERBOSE=1``, in a subprocess) names the implementation MindSpore's native matmul and
Conv2D run. Run it with nothing else on the machine.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

M, K, N = 4096, 768, 3072  # FFN linear: tokens x dim -> hidden
HEADS, SEQ, HEAD_DIM = 12, 1024, 64
CH, SIDE = 128, 128  # VAE conv
CONV = "3x3 conv 128->128 at 128² (ours: 9 tap matmuls, no shifts; torch: conv2d)"
NATIVE = "the same conv on MindSpore's Conv2D (oneDNN)"
COMPILED = "the same conv on the project's compiled oneDNN op (cpu_kernels)"
NORM = "GroupNorm, 32 groups, 128 ch at 256² (MindSpore's GroupNorm; torch: group_norm)"
NORM_COMPILED = "the same GroupNorm on the project's compiled op (cpu_kernels)"
AGAINST = {NATIVE: CONV, COMPILED: CONV, NORM_COMPILED: NORM}  # rows timed against another row's torch figure


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def mindspore_rows(repeats: int) -> dict:
    import mindspore as ms
    from mindspore import Tensor, mint, nn, ops

    from mindone_lumina import backend, cpu_kernels

    backend.set_device("CPU")  # with the host-blocking run, as every tool
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((M, K), np.float32))
    w = Tensor(rng.standard_normal((N, K), np.float32))  # (out, in): nn.Dense's and torch's layout
    w_t = Tensor(np.ascontiguousarray(w.asnumpy().T))  # (in, out)

    class Dense(nn.Cell):  # MatMul(transpose_b=True): the layers of both DiTs
        def __init__(self):
            super().__init__()
            self.mm = ops.MatMul(transpose_b=True)

        def construct(self, x, w):
            y = 0
            for i in range(10):
                y = y + self.mm(x * (i + 1.0), w)
            return y

    class Plain(nn.Cell):  # mint.matmul on a stored (in, out) weight
        def construct(self, x, w):
            y = 0
            for i in range(10):
                y = y + mint.matmul(x * (i + 1.0), w)
            return y

    q, k_t, v = (Tensor(rng.standard_normal(s, np.float32)) for s in
                 ((1, HEADS, SEQ, HEAD_DIM), (1, HEADS, HEAD_DIM, SEQ), (1, HEADS, SEQ, HEAD_DIM)))  # fmt: skip

    class Attention(nn.Cell):  # backend.attention's products: q k^T (keys pre-transposed), then p v
        def construct(self, q, k_t, v):
            y = 0
            for i in range(10):
                y = y + mint.matmul(mint.matmul(q * (i + 1.0), k_t), v)
            return y

    image = Tensor(rng.standard_normal((1, CH, SIDE * SIDE), np.float32))
    taps = Tensor(rng.standard_normal((9, CH, CH), np.float32) * 0.05)

    class Taps(nn.Cell):  # convolution.conv2d's form: one (O, C) @ (B, C, HW) per tap (shifts left out)
        def construct(self, image, taps):
            y = 0
            for i in range(9):
                y = y + mint.matmul(taps[i], image * (i + 1.0))
            return y

    class Native(nn.Cell):  # MindSpore's own Conv2D (oneDNN), one call: on oneDNN's reference path it takes seconds
        def construct(self, image, weight):
            return ops.conv2d(image, weight, pad_mode="pad", padding=1)

    class Compiled(nn.Cell):
        def construct(self, image, weight):
            return cpu_kernels.conv2d(image, weight, mint.zeros((CH,), dtype=ms.float32), 1, 1)

    class Norm(nn.Cell):
        def __init__(self, compiled: bool):
            super().__init__()
            self.use_compiled = compiled

        def construct(self, x, w, b):
            return backend.group_norm(x, 32, w, b, 1e-6, self.use_compiled)

    weight = Tensor(rng.standard_normal((CH, CH, 3, 3), np.float32) * 0.05)
    image_4d = image.reshape(1, CH, SIDE, SIDE)
    dense, plain, attention, conv, native = Dense(), Plain(), Attention(), Taps(), Native()
    feature, scale, shift = (Tensor(rng.standard_normal(s, np.float32)) for s in ((1, CH, 256, 256), (CH,), (CH,)))
    compiled, norm, norm_compiled, conv_compiled = {}, Norm(False), Norm(True), Compiled()
    if backend.compiled_kernels():
        compiled = {
            COMPILED: (best(lambda: conv_compiled(image_4d, weight).asnumpy(), repeats), 9 * 2 * CH * CH * SIDE**2),
            NORM_COMPILED: (best(lambda: norm_compiled(feature, scale, shift).asnumpy(), repeats), 0),
        }  # fmt: skip
    return {
        "linear (MatMul transpose_b, nn.Dense)": (best(lambda: dense(x, w).asnumpy(), repeats), 10 * 2 * M * K * N),
        "linear as plain matmul on an (in, out) weight": (
            best(lambda: plain(x, w_t).asnumpy(), repeats),
            10 * 2 * M * K * N,
        ),  # fmt: skip
        "attention products": (
            best(lambda: attention(q, k_t, v).asnumpy(), repeats),
            10 * 4 * HEADS * SEQ * SEQ * HEAD_DIM,
        ),  # fmt: skip
        CONV: (best(lambda: conv(image, taps).asnumpy(), repeats), 9 * 2 * CH * CH * SIDE**2),
        NATIVE: (best(lambda: native(image_4d, weight).asnumpy(), 1), 9 * 2 * CH * CH * SIDE**2),
        NORM: (best(lambda: norm(feature, scale, shift).asnumpy(), repeats), 0),
        **compiled,
    }


def torch_rows(repeats: int) -> dict:
    import torch

    torch.set_grad_enabled(False)
    x, w = torch.randn(M, K), torch.randn(N, K)
    q, k, v = (torch.randn(1, HEADS, SEQ, HEAD_DIM) for _ in range(3))
    image, weight = torch.randn(1, CH, SIDE, SIDE), torch.randn(CH, CH, 3, 3) * 0.05
    feature, scale, shift = torch.randn(1, CH, 256, 256), torch.randn(CH), torch.randn(CH)

    def linear():
        return sum(torch.nn.functional.linear(x * (i + 1.0), w) for i in range(10))

    def attention():
        return sum(torch.matmul(torch.matmul(q * (i + 1.0), k.transpose(-1, -2)), v) for i in range(10))

    return {
        "linear (MatMul transpose_b, nn.Dense)": (best(linear, repeats), 10 * 2 * M * K * N),
        "attention products": (best(attention, repeats), 10 * 4 * HEADS * SEQ * SEQ * HEAD_DIM),
        CONV: (
            best(lambda: torch.nn.functional.conv2d(image, weight, padding=1), repeats),
            9 * 2 * CH * CH * SIDE**2,
        ),  # fmt: skip
        NORM: (best(lambda: torch.nn.functional.group_norm(feature, 32, scale, shift, 1e-6), repeats), 0),
    }


ONEDNN_PROBE = """
import numpy as np, mindspore as ms
from mindspore import Tensor, mint, ops
ms.set_device("CPU")
a = Tensor(np.ones((512, 512), np.float32))
mint.matmul(a, a).asnumpy()
x, w = Tensor(np.ones((1, 32, 32, 32), np.float32)), Tensor(np.ones((32, 32, 3, 3), np.float32))
ops.conv2d(x, w, pad_mode="pad", padding=1).asnumpy()
"""


def capped_env(isa: str | None, **extra) -> dict:
    """This process's environment for a child whose oneDNN is capped at ``isa`` (None: as oneDNN chooses)."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    return {**env, **({"ONEDNN_MAX_CPU_ISA": isa} if isa else {}), **extra}


def onednn_implementations(isa: str | None = None) -> list:
    """oneDNN's verbose lines: the CPU ISA it detected and the implementation of each primitive MindSpore ran."""
    env = capped_env(isa, ONEDNN_VERBOSE="1")
    done = subprocess.run([sys.executable, "-c", ONEDNN_PROBE], env=env, capture_output=True, text=True, timeout=300)
    keep = ("info,cpu,isa", "info,cpu,runtime", "exec,cpu,matmul", "exec,cpu,convolution")
    return [line for line in done.stdout.splitlines() if any(k in line for k in keep)]


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        info = f.read()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = sorted({f for f in info.split() if f.startswith("avx512") or f in ("avx2", "fma", "amx_tile")})
    return f"{name} ({os.cpu_count()} CPUs; {' '.join(flags)})"


def mindspore_worker(repeats: int, isa: str | None) -> dict:
    """``mindspore_rows`` in a fresh process, oneDNN capped at ``isa`` (it fixes its instruction set at first use)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--repeats", str(repeats), "--worker"]
    done = subprocess.run(cmd, env=capped_env(isa), capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(mindspore_rows(args.repeats)))
        return
    print(f"machine: {cpu_model()}, {platform.system()} {platform.release()}")
    ours, capped = mindspore_worker(args.repeats, None), mindspore_worker(args.repeats, "AVX2")
    theirs = torch_rows(args.repeats)
    print("| product | MindSpore s | GFLOP/s | at AVX2 s | GFLOP/s | torch s | GFLOP/s | ratio | at AVX2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    rate = lambda flops, seconds: f"{flops / seconds / 1e9:.0f}" if flops else "—"  # noqa: E731
    for name, (seconds, flops) in ours.items():
        low, ref = capped[name][0], theirs.get(name)
        if ref:
            ref_text = f"{ref[0]:.3f} | {rate(ref[1], ref[0])} | {seconds / ref[0]:.2f} | {low / ref[0]:.2f}"
        elif name in AGAINST:  # against another row's torch figure
            ref = theirs[AGAINST[name]][0]
            ref_text = f"— | — | {seconds / ref:.2f} | {low / ref:.2f}"
        else:
            ref_text = "— | — | — | —"
        rates = f"{seconds:.3f} | {rate(flops, seconds)} | {low:.3f} | {rate(flops, low)}"
        print(f"| {name} | {rates} | {ref_text} |")
    for isa in (None, "AVX2"):
        print(f"\noneDNN (ONEDNN_VERBOSE=1{', ONEDNN_MAX_CPU_ISA=' + isa if isa else ''}):")
        for line in onednn_implementations(isa):
            print("   ", line)


if __name__ == "__main__":
    main()
