"""Weight conversion throughput and peak memory on a full-size synthetic Lumina-Next checkpoint.

    python benchmarks/bench_convert.py [--workdir /tmp] [--keep]

Builds a checkpoint with the exact ``nextdit-2b-gqa`` tensor list (567 fp32 tensors, 6.51 GB; values are a
repeated random tile, which does not matter for I/O) as the released ``consolidated.00-of-01.safetensors`` and,
through ``torch.save``, as the older ``consolidated.00-of-01.pth``. Each conversion runs ``tools/convert.py`` in a
fresh process; its peak RSS is its own VmHWM and its throughput is source checkpoint bytes / wall time of the
whole process (imports and model-shape setup included) and of the write phase alone (timed by the CLI). Sources are
read from a warm page cache (they were just written); the output is left to the page cache (no fsync), and
``os.sync()`` runs between rows so one row's writeback does not slow the next. The files are deleted afterwards
unless ``--keep``.
"""

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from mindone_lumina.models.nextdit import PRESETS, NextDiT
from mindone_lumina.weights.load import empty, param_shapes
from mindone_lumina.weights.safetensors import SafetensorsFile, write_safetensors
from mindone_lumina.weights.tensors import TensorSpec

CLI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "convert.py")
ARCH = "nextdit-2b-gqa"


def synthetic_checkpoint(folder: str) -> tuple[str, int, int]:
    """Write ``consolidated.00-of-01.safetensors``; returns (path, total bytes, largest tensor bytes)."""
    tile = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    shapes = param_shapes(empty(NextDiT, PRESETS[ARCH]))
    specs = [
        TensorSpec(name, shape, "float32", lambda shape=shape: np.resize(tile, shape))
        for name, shape in sorted(shapes.items())
    ]
    path = os.path.join(folder, "consolidated.00-of-01.safetensors")
    write_safetensors(path, specs, {"format": "pt"})
    return path, sum(s.nbytes for s in specs), max(s.nbytes for s in specs)


def as_pth(safetensors_path: str, folder: str) -> str:
    """The same tensors through ``torch.save`` (copy-on-write memory maps of the safetensors file, no full copy)."""
    reader = SafetensorsFile(safetensors_path)
    state = {}
    for key in reader.keys():
        _, shape, begin, end = reader._entries[key]
        mapped = np.memmap(safetensors_path, np.float32, "c", reader._start + begin, shape)
        state[key] = torch.from_numpy(mapped)
    path = os.path.join(folder, "consolidated.00-of-01.pth")
    torch.save(state, path)
    return path


# Peak RSS is the child's own VmHWM, read just before it exits: ``ru_maxrss`` would include this parent's RSS at fork.
_PEAK = "print([line for line in open('/proc/self/status') if line.startswith('VmHWM')][0])"
_RUN_CLI = f"import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); {_PEAK}"


def _child(argv: list) -> tuple[float, str, float]:
    """(wall seconds, stdout, peak RSS in MB) of ``python -c ...`` in a fresh process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{done.stdout}\n{done.stderr[-2000:]}")
    return seconds, done.stdout, int(re.search(r"VmHWM:\s+(\d+) kB", done.stdout).group(1)) / 1024


def run(args: list) -> tuple[float, float, float]:
    """(wall seconds, seconds of the write phase as printed by the CLI, peak RSS in MB) of one conversion."""
    seconds, out, rss = _child([_RUN_CLI, CLI, *args])
    return seconds, float(re.search(r"MB in ([\d.]+) s", out).group(1)), rss


def baseline_rss() -> float:
    """Peak RSS of a process that only imports the converter and builds the 2B parameter table (MB)."""
    setup = (
        "from mindone_lumina import components; from mindone_lumina.models.nextdit import PRESETS, NextDiT; "
        f"from mindone_lumina.weights.load import empty, param_shapes; param_shapes(empty(NextDiT, PRESETS[{ARCH!r}]))"
    )
    return _child([f"{setup}; {_PEAK}"])[2]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("--keep", action="store_true", help="keep the synthetic files")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir)
    try:
        st_dir, pth_dir = os.path.join(work, "safetensors"), os.path.join(work, "pth")
        os.makedirs(st_dir)
        os.makedirs(pth_dir)
        t0 = time.perf_counter()
        st_path, total, largest = synthetic_checkpoint(st_dir)
        pth_path = as_pth(st_path, pth_dir)
        print(f"synthetic {ARCH}: {total / 1e9:.2f} GB, largest tensor {largest / 1e6:.1f} MB, "
              f"written in {time.perf_counter() - t0:.0f} s")  # fmt: skip
        base = baseline_rss()
        bound = 3 * largest / 2**20 + 300
        host = f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
        print(f"host: {host}, tools/convert.py in a fresh process per row, warm page cache")
        print(
            f"peak RSS budget 3 x largest tensor + 300 MB = {bound:.0f} MB; importing mindspore and building the "
            f"parameter table alone peaks at {base:.0f} MB"
        )
        print("| source | command | wall s | MB/s whole process | MB/s write phase | peak RSS MB |")
        print("|---|---|---|---|---|---|")
        out = os.path.join(work, "out.safetensors")
        cases = [
            ("safetensors fp32", [st_dir, out, "--arch", ARCH, "--force"]),
            (".pth fp32", [pth_path, out, "--arch", ARCH, "--force"]),
            ("safetensors fp32 + verify", [st_dir, out, "--arch", ARCH, "--force", "--verify"]),
            ("safetensors -> bf16", [st_dir, out, "--arch", ARCH, "--dtype", "bf16", "--force"]),
        ]
        for name, cli_args in cases:
            os.sync()  # flush earlier writes so they do not slow this row down
            seconds, write_seconds, rss = run(cli_args)
            write_rate = total / 1e6 / write_seconds
            shown = " ".join(os.path.relpath(a, work) if a.startswith(work) else a for a in cli_args)
            rate = total / 1e6 / seconds
            print(f"| {name} | `convert.py {shown}` | {seconds:.1f} | {rate:.0f} | {write_rate:.0f} | {rss:.0f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
