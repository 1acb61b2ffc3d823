"""Next-DiT forward latency against image-token count, MindSpore graph mode vs PyTorch eager (diffusers 0.35.2).

    python benchmarks/plot_latency.py [--tokens 64 144 256 576 1024] [--repeats 2] [--out PNG]

Same model, inputs and timing as ``bench_nextdit.py`` (hidden 768 / 12 layers, fp32, batch 1, 128-token caption;
each framework and token count in its own process, median after a warm-up call). Token counts must be squares.
"""

import argparse
import os

import bench_nextdit


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 144, 256, 576, 1024])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "latency_vs_tokens.png"))
    args = p.parse_args()
    if any(round(n**0.5) ** 2 != n for n in args.tokens):
        raise ValueError(f"token counts must be squares (square latents at patch 2), got {args.tokens}")
    seconds = {fw: [] for fw in ("graph", "torch")}
    for n in args.tokens:
        for fw in seconds:
            seconds[fw].append(bench_nextdit.run_worker(fw, n, args.repeats)["median"])
        print(f"{n} tokens: MindSpore graph {seconds['graph'][-1]:.3f} s, PyTorch {seconds['torch'][-1]:.3f} s")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(args.tokens, seconds["graph"], marker="o", label="MindSpore graph")
    ax.plot(args.tokens, seconds["torch"], marker="s", label="PyTorch eager")
    ax.set_xlabel("image tokens")
    ax.set_ylabel(f"forward latency, s (median of {args.repeats})")
    ax.set_title("Next-DiT 768 x 12, fp32, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
