"""Context Drop (issue #26, ``mindone_lumina/models/context_drop.py``): what it saves per network evaluation, and what
it does to the images of the bundled default model.

    python benchmarks/bench_context_drop.py                       # both parts: speed, then quality
    python benchmarks/bench_context_drop.py --part speed [--tokens 4096 16384] [--factors 2 4] [--repeats 3] [--depth N]
    python benchmarks/bench_context_drop.py --part quality [--num 48] [--until 0.3 0.6 1.0] [--sheet sheet.png]
    python benchmarks/bench_context_drop.py --quick               # a smoke run of both, seconds: tiny model, 2 prompts

Speed: the 768 x 12 benchmark Next-DiT of ``bench_nextdit.py`` (fp32, 12 heads / 4 kv heads, random weights, a 128-token
caption), batch 2 (``--batch``) as one guided image's evaluation, MindSpore graph mode through the pipeline's CPU
denoiser (``SharedBlockNextDiT``, one block graph). Square grids of ``--tokens`` image tokens (4,096 = 1024² px, 16,384
= 2048² px with the SDXL VAE). Each setting (the full model, each merge factor with all layers merged) runs in its own
process: one call compiles, then ``--repeats`` timed calls, median. Separate processes because MindSpore keeps each
compiled graph's workspace while the process lives: at 2048² the full graph's alone is about 14 GiB, and the settings
side by side in one process reached 23 GiB of 24 and slowed every call down. So each peak RSS is that setting's own. Run
nothing else meanwhile. The seconds per image are computed from the measured seconds per evaluation and the evaluation
count at each ``--until`` of the default sampler (midpoint, 30 grid points, shift 4: 58 evaluations).

Quality: the bundled model at its training size and at 2x and 4x its side (``--sizes`` for others), its default
settings, held-out prompts in its caption template (``shapes.heldout_scenes``), the same seeds with and without
Context Drop (calls of 12 prompts: keep ``--num`` a multiple of 12, or under it, so that one warm-up call compiles
every graph the timed calls use). Per setting (factor x ``--until`` x ``--layers``): seconds per image without
compilation, the detector's accuracy (``shapes.score``), and PSNR (of the mean squared error over all images of the
row) and SSIM (mean; Gaussian window 11, sigma 1.5, per channel, valid region) of each image against the one without
Context Drop. ``--sheet`` writes a contact sheet: per size the first prompts without Context Drop and with each
factor x until (the first ``--layers``).
"""

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

import mindspore as ms
from mindspore import Tensor

from mindone_lumina import sampling, shapes
from mindone_lumina.models import context_drop, nextdit
from mindone_lumina.weights.load import load_state_dict

CFG = nextdit.NextDiTConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, qk_norm=True, cap_feat_dim=2048)
QUICK_CFG = nextdit.NextDiTConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True, cap_feat_dim=64)
CAPTION = 128
VAE_FACTOR = 8  # SDXL VAE, for the pixel sizes the speed table names
KEYS = ("background", "colour", "shape")


# ------------------------------------------------------------------------------------------------------------------
# Speed
# ------------------------------------------------------------------------------------------------------------------
def speed_worker(cfg, tokens: int, factor: int, repeats: int, batch: int) -> dict:
    """{"compile", "median", "peak_gib"} of one token count and merge factor (1 = off), in this process."""
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    model = nextdit.NextDiT(cfg)
    rng = np.random.default_rng(0)
    load_state_dict(model, {p.name: (0.02 * rng.standard_normal(p.shape)).astype(np.float32)
                            for p in model.get_parameters()})  # fmt: skip
    runner = nextdit.SharedBlockNextDiT(model)
    side = int(round(tokens**0.5))
    latent = side * cfg.patch_size
    x = Tensor(rng.standard_normal((batch, cfg.in_channels, latent, latent)).astype(np.float32))
    t = Tensor(np.full((batch,), 0.2, np.float32))
    cap = Tensor(rng.standard_normal((batch, CAPTION, cfg.cap_feat_dim)).astype(np.float32))
    mask = np.ones((batch, CAPTION), np.int32)
    mask[:, 100:] = 0  # a padded caption
    tables = nextdit.rope_inputs(cfg, latent, latent, 0.2)
    extra = () if factor == 1 else (*context_drop.merge_inputs(side, side, factor), tuple(range(cfg.n_layers)))

    def call():
        start = time.perf_counter()
        runner(x, t, cap, Tensor(mask), *tables, *extra).asnumpy()
        return time.perf_counter() - start

    first = call()
    median = statistics.median(call() for _ in range(repeats))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"compile": first - median, "median": median, "peak_gib": peak}


def evaluation_times(settings: sampling.SampleSettings) -> list:
    """The times the sampler evaluates the model at (fixed-step solvers; one entry per evaluation)."""
    seen = []

    def velocity(x, t):
        seen.append(t)
        return 0.0

    grid = sampling.time_grid(settings.num_steps, settings.schedule, settings.shift, settings.steepness)
    sampling.sample(velocity, 0.0, grid, settings.solver)
    return seen


def speed(args, cfg) -> None:
    print(f"# {platform.processor() or platform.machine()}, mindspore {ms.__version__}, CPU graph mode (shared block "
          f"graph), fp32, {cfg.dim} x {cfg.n_layers} Next-DiT ({cfg.n_heads} heads / {cfg.kv_heads} kv heads), batch "
          f"{args.batch}, {CAPTION}-token caption; each setting its own process, median of {args.repeats}")  # fmt: skip
    factors = [f"x{n}" for n in args.factors]
    print("| tokens (px) | full s/eval (compile s, peak GiB) | " + " | ".join(
        f"{f} s/eval (compile s, peak GiB) | {f} speed-up" for f in factors) + " |")  # fmt: skip
    print("|---|---|" + "---|---|" * len(factors))
    default = sampling.SampleSettings()
    when = evaluation_times(default)
    rows = []
    for tokens in args.tokens:
        s = {}
        for factor in [1, *args.factors]:
            cmd = [sys.executable, __file__, "--worker", "--tokens", str(tokens), "--factors", str(factor), "--repeats",
                   str(args.repeats), "--depth", str(cfg.n_layers), "--batch", str(args.batch)]  # fmt: skip
            cmd += ["--quick"] if args.quick else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            s["off" if factor == 1 else f"x{factor}"] = json.loads(out.strip().splitlines()[-1])
        side = int(round(tokens**0.5)) * cfg.patch_size * VAE_FACTOR
        cells = [f"{s[f]['median']:.3f} ({s[f]['compile']:.1f}, {s[f]['peak_gib']:.1f}) | "
                 f"{s['off']['median'] / s[f]['median']:.2f}x" for f in factors]  # fmt: skip
        print(f"| {tokens} ({side}²) | {s['off']['median']:.3f} ({s['off']['compile']:.1f}, "
              f"{s['off']['peak_gib']:.1f}) | " + " | ".join(cells) + " |", flush=True)  # fmt: skip
        rows.append((tokens, s))
    print(f"\nseconds per image computed from the s/eval above: {len(when)} evaluations of the default sampler "
          f"({default.solver}, {default.num_steps} grid points, {default.schedule} {default.shift}), all layers merged "
          "in the evaluations at t < until")  # fmt: skip
    print("| tokens | factor | " + " | ".join(f"until {u}: merged evals, s/image (speed-up)" for u in args.until)
          + " |")  # fmt: skip
    print("|---|---|" + "---|" * len(args.until))
    for tokens, s in rows:
        full = len(when) * s["off"]["median"]
        for f in factors:
            cells = []
            for until in args.until:
                merged = sum(t < until for t in when)
                est = merged * s[f]["median"] + (len(when) - merged) * s["off"]["median"]
                cells.append(f"{merged}, {est:.1f} ({full / est:.2f}x)")
            print(f"| {tokens} | {f} | " + " | ".join(cells) + " |", flush=True)


# ------------------------------------------------------------------------------------------------------------------
# Quality
# ------------------------------------------------------------------------------------------------------------------
def psnr(images, references) -> float:
    """dB, of the mean squared error over all pixels of all images (inf when identical)."""
    mse = np.mean([np.mean((a.astype(np.float64) - b) ** 2) for a, b in zip(images, references)])
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a, b) -> float:
    """SSIM of two (H, W, 3) uint8 images (Wang et al. 2004): Gaussian window 11, sigma 1.5, per channel, mean over
    the valid region and the channels; images under 11 px use a window of their size."""
    size = min(11, *a.shape[:2])
    g = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / 1.5) ** 2)
    g /= g.sum()

    def blur(x):  # separable valid convolution over H and W
        x = np.apply_along_axis(lambda r: np.convolve(r, g, "valid"), 0, x)
        return np.apply_along_axis(lambda r: np.convolve(r, g, "valid"), 1, x)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def generate(pipe, prompts, settings, seed: int, chunk: int = 12):
    """(images as uint8 arrays, PIL images, s/image): chunks of ``chunk`` prompts, seed + chunk start (the same noise
    for every setting). The seconds leave out compilation: a 2-point warm-up run first evaluates at t = 0 and 0.5,
    which compiles the merged graph (unless ``until`` is 0) and the full one (unless ``until`` > 0.5, when no
    evaluation needs it) at this batch and size."""
    pipe(prompts[:chunk], seed=seed, settings=dataclasses.replace(settings, num_steps=2), progress=False)
    start, images = time.perf_counter(), []
    for i in range(0, len(prompts), chunk):
        images += pipe(prompts[i : i + chunk], seed=seed + i, settings=settings, progress=False).images
    return [np.asarray(im) for im in images], images, (time.perf_counter() - start) / len(prompts)


def sheet(rows, path: str, height: int = 128) -> None:
    """A grid of images, one labelled row per (title, [(PIL image, caption)]); every image upscaled (nearest) by a
    whole factor to about ``height`` px."""
    from PIL import Image, ImageDraw

    def big(im):
        k = max(1, height // im.height)
        return im.resize((im.width * k, im.height * k), Image.NEAREST)

    rows = [(title, [(big(im), caption) for im, caption in cells]) for title, cells in rows]
    cell_w = max(im.width for _, cells in rows for im, _ in cells) + 8
    row_h = max(im.height for _, cells in rows for im, _ in cells) + 30  # title above, caption below
    out = Image.new("RGB", (max(len(c) for _, c in rows) * cell_w, len(rows) * row_h), "white")
    draw = ImageDraw.Draw(out)
    for r, (title, cells) in enumerate(rows):
        draw.text((4, r * row_h), title, fill="black")
        for c, (im, caption) in enumerate(cells):
            out.paste(im, (c * cell_w + 4, r * row_h + 14))
            draw.text((c * cell_w + 4, r * row_h + 16 + im.height), caption, fill="black")
    out.save(path)


def quality(args) -> None:
    from mindone_lumina.pipeline import DEFAULT_MODEL, TextToImagePipeline

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    pipe = TextToImagePipeline.from_pretrained(args.model or DEFAULT_MODEL)
    side, depth = pipe.train_size, pipe.transformer.cfg.n_layers
    sizes = args.sizes or [(side, side), (2 * side, 2 * side), (4 * side, 4 * side)]
    layer_specs = args.layers or ["all", f"0-{depth // 2 - 1}", f"{depth // 2}-{depth - 1}"]
    prompts = [shapes.caption(s) for s in shapes.heldout_scenes(args.num, args.seed)]
    base = pipe.defaults if args.steps is None else dataclasses.replace(pipe.defaults, num_steps=args.steps)
    print(f"# {len(prompts)} held-out prompts (canonical captions) per row, seeds from {args.seed}, mindspore "
          f"{ms.__version__} CPU graph mode, model trained at {side}x{side}, {depth} layers; {base}")  # fmt: skip
    print(f"| size | factor | until | layers | {' | '.join(KEYS)} | PSNR dB | SSIM | s/image |")
    print("|---|---|---|---|" + "---|" * (len(KEYS) + 3))
    rows = []
    for width, height in sizes:
        plain = dataclasses.replace(base, height=height, width=width, context_drop=1)
        ref, ref_images, sec = generate(pipe, prompts, plain, args.seed)
        acc = shapes.score(prompts, ref)
        print(f"| {width}x{height} | off | — | — | " + " | ".join(f"{acc[k]:.1%}" for k in KEYS)
              + f" | — | — | {sec:.3f} |", flush=True)  # fmt: skip
        rows.append((f"{width}x{height}, without Context Drop", [(im, "") for im in ref_images[: args.sheet_num]]))
        for n in args.factors:
            for until in args.until:
                for layers in layer_specs:
                    settings = dataclasses.replace(plain, context_drop=n, context_drop_until=until,
                                                   context_drop_layers=layers)  # fmt: skip
                    got, images, sec = generate(pipe, prompts, settings, args.seed)
                    acc = shapes.score(prompts, got)
                    similarity = [ssim(a, b) for a, b in zip(got, ref)]
                    cells = " | ".join(f"{acc[k]:.1%}" for k in KEYS)
                    print(f"| {width}x{height} | {n} | {until} | {layers} | {cells} | {psnr(got, ref):.2f} "
                          f"| {np.mean(similarity):.4f} | {sec:.3f} |", flush=True)  # fmt: skip
                    if layers == layer_specs[0]:
                        cells = [(im, f"SSIM {v:.3f}") for im, v in zip(images[: args.sheet_num], similarity)]
                        rows.append((f"{width}x{height}, factor {n} until {until}, layers {layers}", cells))
    if args.sheet:
        sheet(rows, args.sheet)
        print(f"wrote {args.sheet}")


# ------------------------------------------------------------------------------------------------------------------
def size(text: str) -> tuple:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["speed", "quality", "both"], default="both")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="image tokens per speed row")
    p.add_argument("--factors", type=int, nargs="+", default=[2, 4], help="merge factors (N x N tokens)")
    p.add_argument("--until", type=float, nargs="+", default=[0.3, 0.6, 1.0], help="time windows: merge at t < T")
    p.add_argument("--layers", nargs="+", help="layer specs of the quality rows (default: all, first half, second)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per speed row")
    p.add_argument("--batch", type=int, default=2, help="speed: images per evaluation (default 2: one guided image's "
                   "pair; 1 halves the attention memory, which 2048² needs on 24 GiB)")  # fmt: skip
    p.add_argument("--depth", type=int, help="speed: layers of the model (default: 12). Every layer runs the same "
                   "block graph, so s/eval grows with the depth and the speed-up of merging stays")  # fmt: skip
    p.add_argument("--model", help="quality: a model folder (default: the bundled model)")
    p.add_argument("--sizes", type=size, nargs="+", help="quality: WIDTHxHEIGHT (default: 1x, 2x, 4x the train side)")
    p.add_argument("--num", type=int, default=48, help="quality: held-out prompts per row")
    p.add_argument("--steps", type=int, help="quality: grid points (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sheet", help="quality: write a contact sheet PNG here")
    p.add_argument("--sheet-num", type=int, default=6, help="quality: images per contact sheet row")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny speed model at 64/256 tokens, 1 round; "
                   "2 prompts, 2 grid points, factor 2, until 1.0, all layers")  # fmt: skip
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    cfg = QUICK_CFG if args.quick else CFG
    cfg = cfg if args.depth is None else dataclasses.replace(cfg, n_layers=args.depth)
    if args.worker:
        print(json.dumps(speed_worker(cfg, args.tokens[0], args.factors[0], args.repeats, args.batch)))
        return
    if args.quick:
        args.tokens, args.repeats, args.num, args.steps = [64, 256], 1, 2, 2
        args.factors, args.until, args.layers = [2], [1.0], ["all"]
    if args.part in ("speed", "both"):
        speed(args, cfg)
    if args.part in ("quality", "both"):
        quality(args)


if __name__ == "__main__":
    main()
