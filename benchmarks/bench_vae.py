"""SDXL-VAE decode: MindSpore graph mode vs diffusers (torch) in one run, latency and peak memory.

    python benchmarks/bench_vae.py [--repeats 2] [--tile 64] [--cases ms-1024,torch-1024,ms-1024-tiled,...]

Both frameworks decode the same random ``sdxl-vae`` weights (diffusers' default init, saved once to a temporary
folder; MindSpore reads it through ``components.load_vae``) on the same N(0, 1) latent, batch 1, fp32. Every case runs
in its own subprocess so that its peak RSS (``ru_maxrss``) belongs to one framework and one case. Latency is the median
of ``--repeats`` calls after a first call, which is reported separately (it includes graph compilation); 2048x2048
cases run once (their first call is the measurement; one compiled tile shape makes compilation a small part). Tiled
cases use ``--tile`` latent pixels with overlap 0.25 in both frameworks (diffusers: ``enable_tiling`` with
``tile_latent_min_size`` set to the same tile). Each worker's address space is capped (``--max-memory-gb``) so that a
case too large for the machine fails with an allocation error instead of waking the OOM killer on a shared host.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

CASES = {  # name: (framework, latent side, tiled)
    "torch-1024": ("torch", 128, False),
    "ms-1024": ("ms", 128, False),
    "torch-1024-tiled": ("torch", 128, True),
    "ms-1024-tiled": ("ms", 128, True),
    "torch-2048-tiled": ("torch", 256, True),
    "ms-2048-tiled": ("ms", 256, True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    p.add_argument("--repeats", type=int, default=2, help="timed calls after the first one")
    p.add_argument("--tile", type=int, default=64, help="tile side in latent pixels for tiled cases")
    p.add_argument("--weights", default=None, help="reuse a folder written by an earlier run")
    p.add_argument("--max-memory-gb", type=float, default=18.0, help="address-space cap of each worker (RLIMIT_AS)")
    p.add_argument(
        "--conv", choices=("auto", "onednn", "framework", "taps"), default="auto",
        help="MindSpore's convolution kernel (sets MINDONE_LUMINA_CONV; default: auto, as tools/vae.py chooses; "
        "framework caps oneDNN at AVX2, taps keeps AVX-512)",
    )  # fmt: skip
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def run_case(spec: dict) -> dict:
    cap = int(spec["max_memory_gb"] * 1e9)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    framework, side, tiled, tile = spec["framework"], spec["side"], spec["tiled"], spec["tile"]
    repeats = 0 if side > 128 else spec["repeats"]
    z = np.random.default_rng(0).standard_normal((1, 4, side, side)).astype(np.float32)
    if framework == "torch":
        import torch
        from diffusers import AutoencoderKL

        model = AutoencoderKL.from_pretrained(spec["weights"]).eval()
        if tiled:
            model.enable_tiling()
            model.tile_latent_min_size, model.tile_sample_min_size = tile, tile * 8
        zt = torch.from_numpy(z)

        def decode():
            with torch.no_grad():
                return model.decode(zt).sample.numpy()

        info = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    else:
        import mindspore as ms
        from mindspore import Tensor

        from mindone_lumina import backend, convolution
        from mindone_lumina.components import load_vae
        from mindone_lumina.models.vae import Tiling

        if spec["conv"] != "auto":
            os.environ["MINDONE_LUMINA_CONV"] = spec["conv"]
        backend.set_device("CPU", convolutions=True)  # what tools/vae.py does
        ms.set_context(mode=ms.GRAPH_MODE)
        kernel = convolution.conv_kernel()
        model = load_vae(spec["weights"])
        tiling = Tiling(tile, 0.25) if tiled else None
        zm = Tensor(z)

        def decode():
            return model.decode(zm, tiling).asnumpy()

        info = f"mindspore {ms.__version__}, graph mode, {kernel} convolution kernel"
    loaded = rss_gb()
    t0 = time.perf_counter()
    out = decode()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        decode()
        times.append(time.perf_counter() - t0)
    return {
        "info": info,
        "shape": list(out.shape),
        "finite": bool(np.isfinite(out).all()),
        "first_s": first,
        "latency_s": statistics.median(times) if times else first,
        "rss_after_load_gb": loaded,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def save_random_weights(folder: str) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        sample_size=1024,
        scaling_factor=0.13025,
    ).save_pretrained(folder)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))))
        return
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; expected a subset of {list(CASES)}")
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights or os.path.join(tmp, "sdxl-vae-random")
        if not args.weights:
            save_random_weights(weights)
        results = {}
        for name in cases:
            framework, side, tiled = CASES[name]
            spec = dict(framework=framework, side=side, tiled=tiled, tile=args.tile, repeats=args.repeats)
            spec["max_memory_gb"], spec["conv"] = args.max_memory_gb, args.conv
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps({**spec, "weights": weights})]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                print(f"{name}: failed\n{done.stderr[-2000:]}", flush=True)
                continue
            r = results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"{name:18s} {side * 8}x{side * 8} tiled={tiled!s:5s} latency {r['latency_s']:7.2f} s  first call "
                f"{r['first_s']:7.2f} s  peak RSS {r['peak_rss_gb']:5.2f} GB (after load {r['rss_after_load_gb']:.2f})"
                f"  finite={r['finite']}  [{r['info']}]",
                flush=True,
            )
    for suffix in ("1024", "1024-tiled", "2048-tiled"):
        ms_r, pt_r = results.get(f"ms-{suffix}"), results.get(f"torch-{suffix}")
        if ms_r and pt_r:
            print(
                f"ratio {suffix}: MindSpore/torch latency {ms_r['latency_s'] / pt_r['latency_s']:.2f}x, "
                f"peak RSS {ms_r['peak_rss_gb'] / pt_r['peak_rss_gb']:.2f}x"
            )
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, repeats {args.repeats}")


if __name__ == "__main__":
    main()
