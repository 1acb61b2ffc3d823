"""Prompt-following of the bundled default model on held-out shape/colour/background combinations.

    python benchmarks/eval_shapes.py [--model DIR] [--num 200] [--table --table-num 48] [--table]

Prompts are captions of ``shapes.heldout_scenes`` (combinations never seen in training); the deterministic detector
(``shapes.detect``) reads background colour, shape colour, shape class, size and position back from each generated
image. Without ``--table`` it scores the default settings; ``--table`` sweeps steps x solver x schedule and reports
seconds/image.
"""

import argparse
import time

import numpy as np

import mindspore as ms

from mindone_lumina import shapes
from mindone_lumina.pipeline import DEFAULT_MODEL, TextToImagePipeline
from mindone_lumina.sampling import SampleSettings


def evaluate(pipe, prompts, settings: SampleSettings, seed: int = 0, chunk: int = 24):
    """Generate in chunks of ``chunk`` prompts (CPU graph memory grows with the batch), seed + chunk index."""
    start = time.perf_counter()
    images = []
    for i in range(0, len(prompts), chunk):
        images += pipe(prompts[i : i + chunk], seed=seed + i, settings=settings, progress=False).images
    seconds = (time.perf_counter() - start) / len(prompts)
    return shapes.score(prompts, [np.asarray(im) for im in images]), seconds, images


def contact_sheet(prompts, images, path: str, cols: int = 4, scale: int = 4):
    """Images upscaled ``scale`` x (nearest) with their prompts and the detector's verdict underneath."""
    from PIL import Image, ImageDraw

    w, h = images[0].width * scale, images[0].height * scale
    cell_w, cell_h = max(w, 260), h + 44
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (prompt, im) in enumerate(zip(prompts, images)):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        sheet.paste(im.resize((w, h), Image.NEAREST), (x + (cell_w - w) // 2, y))
        want, got = shapes.parse_prompt(prompt), shapes.detect(np.asarray(im))
        ok = (
            "ok"
            if all(want[k] == got[k] for k in want)
            else f"seen: {got['colour']} {got['shape']} / {got['background']}"
        )
        words = prompt.split(" in the ")
        draw.text((x + 4, y + h + 2), words[0][:40], fill="black")
        draw.text((x + 4, y + h + 14), ("in the " + words[1])[:40] if len(words) > 1 else "", fill="black")
        draw.text((x + 4, y + h + 28), ok[:40], fill=(0, 120, 0) if ok == "ok" else (200, 0, 0))
    sheet.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", action="store_true")
    p.add_argument("--table-num", type=int, default=24, help="prompts per cell of the table (the first of --num)")
    p.add_argument("--sheet", default=None, help="also write a contact sheet PNG of the first 24 prompts")
    args = p.parse_args()
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    pipe = TextToImagePipeline.from_pretrained(args.model)
    prompts = [shapes.caption(s) for s in shapes.heldout_scenes(args.num, seed=args.seed)]
    evaluate(pipe, prompts[:24], SampleSettings(num_steps=2))  # compile outside the timings
    print(f"# {args.num} held-out prompts, seed {args.seed}, MindSpore {ms.__version__} graph mode, CPU")
    print(
        "| steps | solver | schedule | prompts | background | shape colour | shape class | size | position | s/image |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    grid = [(30, "midpoint", "shift")]  # the default settings
    if args.table:
        grid += [
            (n, so, sc)
            for n in (4, 8, 16, 32)
            for so in ("euler", "midpoint")
            for sc in ("uniform", "shift", "sigmoid")
        ]
    for i, (steps, solver, schedule) in enumerate(grid):
        cell = prompts if i == 0 else prompts[: args.table_num]
        acc, sec, images = evaluate(pipe, cell, SampleSettings(num_steps=steps, solver=solver, schedule=schedule))
        if args.sheet and (steps, solver, schedule) == grid[0]:
            contact_sheet(prompts[:24], images[:24], args.sheet)
        scores = " | ".join(f"{acc[k]:.1%}" for k in ("background", "colour", "shape", "size", "position"))
        print(f"| {steps} | {solver} | {schedule} | {len(cell)} | {scores} | {sec:.3f} |", flush=True)


if __name__ == "__main__":
    main()
