"""Top ten MindSpore CPU op types of a training step, by time, from MindSpore's own Profiler.

    python benchmarks/profile_ops.py [--model bench] [--batch 4] [--tokens 256] [--steps 3] [--precision fp32]
    python benchmarks/profile_ops.py --vae [--batch 16]      # the VAE step of bench_vae_train.py (shipped recipe)

The step is ``bench_train.py``'s (``training.Trainer.step`` in graph mode, same model, batch and weights) or, with
``--vae``, ``bench_vae_train.py``'s (``configs/shapes-vae.yaml``, batch 16 unless ``--batch`` is given).
``workers.WARMUP`` warm-up steps, then ``--steps`` profiled ones; the table gives per step each op type's kernel
count, milliseconds and share of the summed kernel time, and the total kernel count. Kernel times of tiny ops are
inflated by the profiler (a ReduceSum of 384 floats reads 0.65 ms in the profile and 0.01 ms in a graph of its own),
so read the table for where the time goes and the wall-clock benchmarks for how much.
"""

import argparse
import csv
import glob
import os
import platform
import tempfile

import bench_train
import bench_vae_train
from workers import WARMUP


def top_ops(folder: str, steps: int, count: int = 10) -> tuple:
    """(total ms per step, kernels per step, [(op type, kernels, ms, share)]) from a Profiler output folder."""
    (path,) = glob.glob(os.path.join(folder, "*", "FRAMEWORK", "cpu_op_type_info_0.csv"))
    with open(path, newline="") as f:
        rows = [(r["op_type"], int(r["execution_frequency(per-step)"]), float(r["total_compute_time"]) / steps)
                for r in csv.DictReader(f)]  # fmt: skip
    total = sum(ms for _, _, ms in rows)
    kernels = sum(n for _, n, _ in rows)
    rows.sort(key=lambda r: -r[2])
    return total, kernels, [(op, n, ms, ms / total) for op, n, ms in rows[:count]]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(bench_train.MODELS), default="bench", help="(default: bench)")
    p.add_argument("--vae", action="store_true", help="profile the VAE training step instead (default: Next-DiT)")
    p.add_argument("--batch", type=int, default=None, help="(default: 4; with --vae 16)")
    p.add_argument("--tokens", type=int, default=256, help="image tokens per sample (default: 256)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps after the warm-up steps (default: 3)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="(default: fp32)")
    args = p.parse_args()
    args.batch = args.batch or (16 if args.vae else 4)
    if args.steps < 1 or args.batch < 1 or args.tokens < 1:
        p.error("--steps, --batch and --tokens must be positive")
    import mindspore as ms

    if args.vae:
        recipe = argparse.Namespace(recipe="configs/shapes-vae.yaml", batch=args.batch)
        step = bench_vae_train.project_step(bench_vae_train.load_recipe(recipe))
        what = f"VAE of configs/shapes-vae.yaml, batch {args.batch}, fp32"
    else:
        bench_train.CONFIG, bench_train.CAPTION = bench_train.MODELS[args.model]
        step = bench_train.project_step(args.precision, args.batch, args.tokens)
        what = f"{args.model} model, batch {args.batch} x {args.tokens} tokens, {args.precision}"
    for _ in range(WARMUP):
        step()
    with tempfile.TemporaryDirectory() as out:
        profiler = ms.Profiler(output_path=out)
        for _ in range(args.steps):
            step()
        profiler.stop()
        profiler.analyse()
        total, kernels, top = top_ops(out, args.steps)
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, mindspore {ms.__version__}; {what}, {args.steps} profiled steps")
    print(f"# kernel time {total:.1f} ms per step, {kernels} kernels per step")
    print("| op type | kernels / step | ms / step | share |")
    print("|---|---|---|---|")
    for op, n, ms_, share in top:
        print(f"| {op} | {n} | {ms_:.1f} | {share:.1%} |")


if __name__ == "__main__":
    main()
