"""Which MindSpore CPU kernels are slow, and why: matmul forms and convolution against torch on the same shapes.

    python benchmarks/probe_cpu_kernels.py [--repeats 3]

Graph mode, fp32, 10 (matmul) or 9 (conv taps) products per graph, each on a differently scaled input so that the
compiler cannot merge them; the best of ``--repeats`` runs. Shapes are the project's: a Next-DiT FFN linear (4,096
tokens x 768 -> 3,072), attention products (12 heads x 1,024 tokens x 64) and a VAE 3x3 conv (128 -> 128 channels at
128² px). Then oneDNN's own report (``ONEDNN_VERBOSE=1``, in a subprocess) names the implementation MindSpore's native
matmul and Conv2D run. Run it with nothing else on the machine.
"""

import argparse
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

    ms.set_device("CPU")
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

    class Taps(nn.Cell):  # backend.conv2d's form: one (O, C) @ (B, C, HW) per tap (shifts left out)
        def construct(self, image, taps):
            y = 0
            for i in range(9):
                y = y + mint.matmul(taps[i], image * (i + 1.0))
            return y

    dense, plain, attention, conv = Dense(), Plain(), Attention(), Taps()
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
    }


def torch_rows(repeats: int) -> dict:
    import torch

    torch.set_grad_enabled(False)
    x, w = torch.randn(M, K), torch.randn(N, K)
    q, k, v = (torch.randn(1, HEADS, SEQ, HEAD_DIM) for _ in range(3))
    image, weight = torch.randn(1, CH, SIDE, SIDE), torch.randn(CH, CH, 3, 3) * 0.05

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


def onednn_implementations() -> list:
    """oneDNN's verbose lines: the CPU ISA it detected and the implementation of each primitive MindSpore ran."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    done = subprocess.run([sys.executable, "-c", ONEDNN_PROBE], env=env, capture_output=True, text=True, timeout=300)
    keep = ("info,cpu,isa", "info,cpu,runtime", "exec,cpu,matmul", "exec,cpu,convolution")
    return [line for line in done.stdout.splitlines() if any(k in line for k in keep)]


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        info = f.read()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = sorted({f for f in info.split() if f.startswith("avx512") or f in ("avx2", "fma", "amx_tile")})
    return f"{name} ({os.cpu_count()} CPUs; {' '.join(flags)})"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"machine: {cpu_model()}, {platform.system()} {platform.release()}")
    ours, theirs = mindspore_rows(args.repeats), torch_rows(args.repeats)
    print("| product | MindSpore s | GFLOP/s | torch s | GFLOP/s | ratio |\n|---|---|---|---|---|---|")
    for name, (seconds, flops) in ours.items():
        ref = theirs.get(name)
        ref_text = f"{ref[0]:.3f} | {ref[1] / ref[0] / 1e9:.0f} | {seconds / ref[0]:.2f}" if ref else "— | — | —"
        print(f"| {name} | {seconds:.3f} | {flops / seconds / 1e9:.0f} | {ref_text} |")
    print("\noneDNN (ONEDNN_VERBOSE=1):")
    for line in onednn_implementations():
        print("   ", line)


if __name__ == "__main__":
    main()
