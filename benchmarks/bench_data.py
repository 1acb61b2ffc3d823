"""The training data pipeline (issue #27): peak memory of a training run against the dataset size, loader throughput
against the training step, feature extraction with 1 and 2 msrun workers.

    python benchmarks/bench_data.py memory [--sizes 2000 20000 200000] [--before REPO]
    python benchmarks/bench_data.py loader [--samples 20000] [--workers 0 1 2] [--batches 300]
    python benchmarks/bench_data.py extract [--items 2000]

All three train or extract with the bundled default model's recipe (``configs/shapes-demo.yaml``: its text encoder
and VAE from ``mindone_lumina/assets/shapes-demo``, batch 32, three aspect-ratio buckets).

* ``memory``: ``tools/train.py`` for 20 steps over a synthetic feature store of N samples (latents of the default
  model's three bucket shapes, caption features of 6-20 tokens; written directly, so 200,000 samples take seconds),
  peak RSS of the training process and of it with its loader workers (sampled every 0.2 s). ``--before REPO``: the
  same run with the trainer of another checkout (e.g. a git worktree of the commit before the loader), which reads
  the N images (drawn by ``tools/make_shapes_dataset.py``) and holds every latent and caption feature in memory.
* ``loader``: batches per second of ``loader.batches`` over the store (no training) per worker count, against the
  samples per second the training step consumes (the log of a 40-step run on the same store).
* ``extract``: ``tools/extract_features.py`` over N shapes images, in one process and with msrun (2 workers).
"""

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ASSETS = os.path.join(ROOT, "mindone_lumina", "assets", "shapes-demo")
TEXT_ENCODER, VAE = os.path.join(ASSETS, "text_encoder"), os.path.join(ASSETS, "vae")
LATENTS = [(4, 8, 8), (4, 12, 6), (4, 6, 12)]  # the default recipe's buckets 32x32, 48x24, 24x48 through the 4x VAE


def recipe_file(work: str, name: str, **keys) -> str:
    """The default model's recipe with ``keys`` replaced, written to ``work/name.yaml``."""
    with open(os.path.join(ROOT, "configs", "shapes-demo.yaml")) as f:
        raw = yaml.safe_load(f)
    raw.update(text_encoder=TEXT_ENCODER, vae=VAE, save_every=100_000, log_every=10, **keys)
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def captions(folder: str, n: int) -> None:
    """A captions.jsonl of ``n`` entries (the store path never opens the images)."""
    os.makedirs(folder, exist_ok=True)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        for i in range(n):
            f.write(json.dumps({"image": f"{i}.png", "caption": f"a {colours[i % 6]} circle number {i}"}) + "\n")


def synthetic_store(work: str, n: int) -> tuple:
    """(data folder, store folder) of ``n`` synthetic samples, made once."""
    from mindone_lumina.training.data import buckets
    from mindone_lumina.training.extract import store_meta
    from mindone_lumina.training.feature_store import ShardWriter, write_shared
    from mindone_lumina.training.sources import read_items

    data, store = os.path.join(work, f"data-{n}"), os.path.join(work, f"store-{n}")
    if os.path.isdir(store):
        return data, store
    captions(data, n)
    items = read_items(data)
    meta = store_meta(items, TEXT_ENCODER, VAE, buckets(32, (1.0, 0.5, 2.0), 8), 256)
    rng = np.random.default_rng(0)
    with ShardWriter(store + ".tmp", "r0", meta, 64 << 20) as writer:
        for start in range(0, n, 1000):
            for i in range(start, min(n, start + 1000)):
                latent = rng.standard_normal(LATENTS[i % 3]).astype(np.float32)
                feats = rng.standard_normal((6 + i % 15, 64)).astype(np.float32)
                writer.add(str(i), {"latent": latent, "cap_feats": feats})
            writer.commit()
    write_shared(store + ".tmp", "empty_caption", {"cap_feats": rng.standard_normal((1, 64)).astype(np.float32)})
    os.replace(store + ".tmp", store)
    return data, store


def shapes_images(work: str, n: int) -> str:
    """A folder of ``n`` shapes images of the default recipe's sizes with captions.jsonl, made once."""
    images = os.path.join(work, f"images-{n}")
    if not os.path.isdir(images):
        tool = os.path.join(ROOT, "tools", "make_shapes_dataset.py")
        cmd = [sys.executable, tool, "--out", images, "--num", str(n), "--size", "32", "--aspect-ratios", "1,0.5,2"]
        subprocess.run(cmd + ["--variety"], check=True, capture_output=True)
    return images


def run_measured(cmd: list, env=None, cwd=None) -> dict:
    """Run ``cmd``; its wall time, peak RSS and peak RSS with its descendants (GiB), and its output."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    main, tree = 0, 0
    ps = psutil.Process(proc.pid)
    out = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        rss = children = 0
        try:
            rss = ps.memory_info().rss
            for child in ps.children(recursive=True):
                try:
                    children += child.memory_info().rss
                except psutil.Error:  # a worker that ended between the listing and the reading
                    pass
        except psutil.Error:  # the run itself is ending
            pass
        main, tree = max(main, rss), max(tree, rss + children)
        time.sleep(0.2)
    proc.wait()
    reader.join()
    text = "".join(out)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    gib = 1024**3
    return {"seconds": time.perf_counter() - start, "rss": main / gib, "rss_tree": tree / gib, "log": text}


def memory(args) -> None:
    print("| samples | path | peak RSS GiB (trainer) | with loader workers | wall s |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        data, store = synthetic_store(args.work, n)
        run = os.path.join(args.work, f"run-store-{n}")
        shutil.rmtree(run, ignore_errors=True)
        path = recipe_file(args.work, f"store-{n}", data=data, output=run, feature_store=store, steps=20)
        m = run_measured([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--config", path])
        print(f"| {n:,} | feature store (streamed) | {m['rss']:.2f} | {m['rss_tree']:.2f} | {m['seconds']:.0f} |")
        if args.before:
            images = shapes_images(args.work, n)
            run = os.path.join(args.work, f"run-before-{n}")
            shutil.rmtree(run, ignore_errors=True)
            path = recipe_file(args.work, f"before-{n}", data=images, output=run, steps=20)
            env = {**os.environ, "PYTHONPATH": args.before}
            m = run_measured([sys.executable, os.path.join(args.before, "tools", "train.py"), "--config", path], env)
            print(f"| {n:,} | in memory (before) | {m['rss']:.2f} | {m['rss_tree']:.2f} | {m['seconds']:.0f} |")
        sys.stdout.flush()


def loader_speed(args) -> None:
    from mindone_lumina.training import TrainConfig, loader
    from mindone_lumina.training.feature_store import FeatureStore

    data, store = synthetic_store(args.work, args.samples)
    cfg = TrainConfig.from_yaml(recipe_file(args.work, "loader", data=data, output="unused", feature_store=store))
    samples = loader.CachedSamples(FeatureStore(store), cfg.max_caption_tokens)
    print(f"| loader workers | samples/s (batches of {cfg.batch_size}, {args.batches} batches) |")
    print("|---|---|")
    for workers in args.workers:
        stream = loader.batches(samples, cfg, 0, args.batches, workers=workers)
        next(stream)  # the workers started
        start = time.perf_counter()
        count = sum(1 for _ in stream)
        rate = count * cfg.batch_size / (time.perf_counter() - start)
        print(f"| {workers} | {rate:,.0f} |")
        sys.stdout.flush()
    run = os.path.join(args.work, "run-loader")
    shutil.rmtree(run, ignore_errors=True)
    path = recipe_file(args.work, "loader-train", data=data, output=run, feature_store=store, steps=40)
    m = run_measured([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--config", path])
    rates = [float(r) for r in re.findall(r"([0-9.]+) samples/s", m["log"])]
    print(f"training step consumption (steps 31-40, loader workers {cfg.loader_workers}): {rates[-1]:.1f} samples/s")


def extraction(args) -> None:
    images = shapes_images(args.work, args.items)
    print("| msrun workers | wall s | items/s (wall, start-up included) |")
    print("|---|---|---|")
    for workers in (1, 2):
        out = os.path.join(args.work, f"extract-{workers}")
        shutil.rmtree(out, ignore_errors=True)
        cmd = [os.path.join(ROOT, "tools", "extract_features.py"), "--data", images, "--text-encoder", TEXT_ENCODER,
               "--vae", VAE, "--output", out, "--resolution", "32", "--aspect-ratios", "1", "0.5", "2",
               "--bucket-multiple", "8", "--batch", "32"]  # fmt: skip
        env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
        if workers > 1:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = ["msrun", f"--worker_num={workers}", f"--local_worker_num={workers}", "--master_addr=127.0.0.1",
                   f"--master_port={port}", "--join=True", f"--log_dir={out}-logs"] + cmd  # fmt: skip
        else:
            cmd = [sys.executable] + cmd
        m = run_measured(cmd, env)
        print(f"| {workers} | {m['seconds']:.1f} | {args.items / m['seconds']:.0f} |")
        sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 200000])
    m.add_argument("--before", help="a checkout whose tools/train.py holds the dataset in memory (the old path)")
    ld = sub.add_parser("loader")
    ld.add_argument("--samples", type=int, default=20000)
    ld.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ld.add_argument("--batches", type=int, default=300)
    ex = sub.add_parser("extract")
    ex.add_argument("--items", type=int, default=2000)
    for p in (m, ld, ex):
        p.add_argument("--work", default="/tmp/bench_data", help="scratch folder (stores, images, runs)")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    cpu = platform.processor() or platform.machine()
    print(f"# bench_data {args.what}, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores {cpu}, "
          f"{psutil.virtual_memory().total / 1024**3:.0f} GiB")  # fmt: skip
    {"memory": memory, "loader": loader_speed, "extract": extraction}[args.what](args)


if __name__ == "__main__":
    main()
