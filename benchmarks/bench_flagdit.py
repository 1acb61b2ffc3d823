"""Flag-DiT 5B (``flagdit-5b``) forward on CPU in MindSpore graph mode: time and peak RSS at 1024 image tokens.

    python benchmarks/bench_flagdit.py                        # fp16, 4 of the 32 blocks, extrapolated to 32
    python benchmarks/bench_flagdit.py --dtype fp32 --layers 4

Random weights (normal, std 0.02), batch 1, a 64 x 62 latent (32 rows of 31 patches + an eol token = 1024 tokens), a
128-token caption (100 valid), proportional attention on. Reports the first call (graph compile + run) and the median
of ``repeats`` further calls, achieved GFLOP/s and peak RSS. ``--layers N`` keeps the preset's widths and runs N
blocks; the time of the 32-block model is then extrapolated from the per-block time (embedders and final layer are
under 0.1 % of the FLOPs).

Memory: 5.05 B parameters are 20.2 GB in fp32 and 10.1 GB in fp16. In MindSpore 2.10's CPU graph mode a 1024-token
forward also holds about 2 GB of intermediate buffers per block (not reused from block to block; measured at 1, 2 and
4 blocks) and a second copy of fp16 parameters, so the 32-block graph would need some 70 GB: it cannot run on a 24 GB
machine in any dtype. The script estimates its need first and refuses to start when ``MemAvailable`` is short of it.
"""

import argparse
import platform
import resource
import statistics
import time

import numpy as np

import mindspore as ms
from mindspore import Tensor
from mindspore.nn.utils import no_init_parameters

from mindone_lumina.dtypes import ms_dtype
from mindone_lumina.models import flagdit

PRESET = "flagdit-5b"
CAPTION, VALID = 128, 100
GRAPH_COPY = {"fp16": 1.0, "fp32": 0.0}  # extra resident bytes per parameter byte in CPU graph mode (measured)
GIB_PER_BLOCK = 2.0  # graph-mode intermediate buffers of one block at 1024 tokens (measured, see module docstring)


def forward_flops(cfg: flagdit.FlagDiTConfig, seq: int, cap: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of the block linears and attention matmuls; norms and elementwise ops excluded."""
    d, kv, f, y = cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_hidden, cfg.cap_feat_dim
    per_block = seq * (2 * d * d + 2 * d * kv + 3 * d * f) + cap * 2 * y * kv  # projections and FFN
    per_block += 2 * seq * seq * d + 2 * seq * cap * d  # QK^T and PV for self and cross attention
    return 2.0 * cfg.n_layers * per_block


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def build(cfg: flagdit.FlagDiTConfig, dtype) -> flagdit.FlagDiT:
    """The model with random weights stored directly in ``dtype`` (never a whole fp32 copy), one tensor at a time."""
    with no_init_parameters():
        model = flagdit.FlagDiT(cfg)
    rng = np.random.default_rng(0)
    np_dtype = np.float16 if dtype == ms.float16 else np.float32
    for p in model.get_parameters():
        value = 1.0 + 0.02 * rng.standard_normal(p.shape, np.float32) if "norm" in p.name else None
        value = 0.02 * rng.standard_normal(p.shape, np.float32) if value is None else value
        p.set_dtype(dtype)
        p.set_data(Tensor(value.astype(np_dtype)))
    return model


def inputs(cfg: flagdit.FlagDiTConfig, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, cfg.in_channels, 64, 62)).astype(np.float32)  # 32 x (31 + eol) = 1024 tokens
    cap = rng.standard_normal((1, CAPTION, cfg.cap_feat_dim)).astype(np.float32)
    mask = np.zeros((1, CAPTION), np.int32)
    mask[:, :VALID] = 1
    t = Tensor(np.array([0.5], np.float32))
    return Tensor(x).astype(dtype), t, Tensor(cap).astype(dtype), Tensor(mask)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="blocks to run (the preset has 32); the rest extrapolated")
    p.add_argument("--dtype", default="fp16", choices=sorted(GRAPH_COPY))
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    full = flagdit.PRESETS[PRESET]
    if not 1 <= args.layers <= full.n_layers:
        raise SystemExit(f"--layers must be in [1, {full.n_layers}], got {args.layers}")
    cfg = flagdit.FlagDiTConfig(**{**vars(full), "n_layers": args.layers})
    bytes_per = 2 if args.dtype == "fp16" else 4
    need_gb = (
        cfg.num_parameters() * bytes_per * (1 + GRAPH_COPY[args.dtype]) / 2**30 + GIB_PER_BLOCK * args.layers + 1.5
    )
    have_gb = mem_available_gb()
    if need_gb > have_gb:
        raise SystemExit(f"refusing to run: {args.layers} layers in {args.dtype} need about {need_gb:.1f} GiB in graph "
                         f"mode, MemAvailable is {have_gb:.1f} GiB (use fewer --layers)")  # fmt: skip

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    dtype = ms_dtype(args.dtype)
    t0 = time.perf_counter()
    model = build(cfg, dtype)
    setup = time.perf_counter() - t0
    built_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    x, t, cap, mask = inputs(cfg, dtype)
    scaling = flagdit.RopeScaling(base_seqlen=flagdit.attention_base_seqlen())
    seq = flagdit.token_count(cfg, x.shape[2], x.shape[3])
    assert seq == 1024, seq

    def run():
        out = flagdit.forward(model, x, t, cap, mask, scaling).asnumpy()
        assert np.isfinite(out).all()

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gflops = forward_flops(cfg, seq, CAPTION) / median / 1e9
    print(f"# {platform.processor() or platform.machine()}, mindspore {ms.__version__}, CPU graph mode, {args.dtype} "
          f"parameters and compute, MemAvailable at start {have_gb:.1f} GiB")  # fmt: skip
    print(f"{PRESET} widths, {args.layers}/{full.n_layers} blocks ({cfg.num_parameters() / 1e9:.2f} B parameters), "
          f"{seq} tokens + {CAPTION}-token caption: setup {setup:.1f} s, first call {first:.1f} s (compile "
          f"{first - median:.1f} s), median of {args.repeats} {median:.2f} s {sorted(round(s, 2) for s in times)}, "
          f"{gflops:.0f} GFLOP/s, peak RSS {peak_gb:.2f} GiB ({built_gb:.2f} GiB after building the model, "
          f"{(peak_gb - built_gb) / args.layers:.2f} GiB more per block while running)")  # fmt: skip
    if args.layers < full.n_layers:
        per_block = median / args.layers
        print(f"extrapolated {full.n_layers}-block forward: {per_block * full.n_layers:.1f} s ({per_block:.2f} s per "
              f"block); parameter memory of the whole model: {full.num_parameters() * bytes_per / 2**30:.1f} GiB "
              f"{args.dtype} (+{GRAPH_COPY[args.dtype]:.1f}x in CPU graph mode)")  # fmt: skip


if __name__ == "__main__":
    main()
