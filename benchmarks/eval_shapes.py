"""Prompt-following of the bundled default model on held-out shape/colour/background combinations, per caption form,
and its resolution extrapolation per RoPE mode.

    python benchmarks/eval_shapes.py [--model DIR] [--num 200] [--sheet docs/shapes-contact-sheet.png]
    python benchmarks/eval_shapes.py --extrapolation [--num 48] [--sheet docs/shapes-extrapolation.png]
    python benchmarks/eval_shapes.py --table [--table-num 24]

Prompts are captions of ``shapes.heldout_scenes`` (combinations never seen in training) in each caption form
(``shapes.FORMS``: naming neither size nor position, the size, the position, both; phrasings drawn per form); the
deterministic detector (``shapes.detect``) reads background colour, shape colour, shape class, size, position and the
number of shapes back from each generated image. The default run scores every form at the model's default settings.
``--extrapolation`` generates "plain" prompts at 2x the training side and as a 1:4 panorama (training height, 4x its
width) with each RoPE mode of ``MODES``; ``--table`` sweeps steps x solver x schedule on the long form.
"""

import argparse
import time

import numpy as np

import mindspore as ms

from mindone_lumina import shapes
from mindone_lumina.pipeline import DEFAULT_MODEL, TextToImagePipeline
from mindone_lumina.sampling import SampleSettings

KEYS = ("background", "colour", "shape", "size", "position", "duplicated")
MODES = {  # RoPE beyond the training area: SampleSettings fields of each mode the extrapolation table compares
    "off (plain RoPE)": {"scaling": "off"},
    "PI (always)": {"scale_watershed": 1.0},
    "NTK (always)": {"scale_watershed": 0.0},
    "time-aware switch (original, 0.3)": {"scale_watershed": 0.3},
    "smooth time-aware": {"smooth_rope": True},
}


def evaluate(pipe, prompts, settings: SampleSettings, seed: int = 0, chunk: int = 24):
    """Generate in chunks of ``chunk`` prompts (CPU graph memory grows with the batch), seed + chunk index."""
    start = time.perf_counter()
    images = []
    for i in range(0, len(prompts), chunk):
        images += pipe(prompts[i : i + chunk], seed=seed + i, settings=settings, progress=False).images
    seconds = (time.perf_counter() - start) / len(prompts)
    return shapes.score(prompts, [np.asarray(im) for im in images]), seconds, images


def verdict(prompt: str, image) -> str:
    want, got = shapes.parse_prompt(prompt), shapes.detect(np.asarray(image))
    if all(want[k] == got[k] for k in want) and got["count"] == 1:
        return "ok"
    return f"seen: {got['colour']} {got['shape']} / {got['background']}" + (
        f" x{got['count']}" if got["count"] > 1 else ""
    )


def contact_sheet(rows, path: str, scale: int = 3):
    """A grid of labelled cells: ``rows`` is a list of (row title, [(caption, PIL image, verdict)]). Images are
    upscaled ``scale`` x (nearest)."""
    from PIL import Image, ImageDraw

    w = max(im.width for _, cells in rows for _, im, _ in cells) * scale
    h = max(im.height for _, cells in rows for _, im, _ in cells) * scale
    cell_w, cell_h, title_h = max(w, 200) + 8, h + 44, 16
    cols = max(len(cells) for _, cells in rows)
    sheet = Image.new("RGB", (cols * cell_w, len(rows) * (cell_h + title_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (title, cells) in enumerate(rows):
        y0 = r * (cell_h + title_h)
        draw.text((4, y0 + 2), title, fill="black")
        for c, (text, im, ok) in enumerate(cells):
            x, y = c * cell_w, y0 + title_h
            big = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
            sheet.paste(big, (x + (cell_w - big.width) // 2, y))
            draw.text((x + 4, y + h + 2), text[:34], fill="black")
            draw.text((x + 4, y + h + 14), text[34:68], fill="black")
            draw.text((x + 4, y + h + 28), ok[:34], fill=(0, 120, 0) if ok == "ok" else (200, 0, 0))
    sheet.save(path)


def row(label: str, n: int, acc: dict, seconds: float) -> str:
    cells = " | ".join("—" if acc[k] is None else f"{acc[k]:.1%}" for k in KEYS)
    return f"| {label} | {n} | {cells} | {seconds:.3f} |"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--num", type=int, default=200, help="prompts per form (per cell with --extrapolation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forms", default=",".join(shapes.FORMS), help="caption forms to score (default: all)")
    p.add_argument("--extrapolation", action="store_true", help="the RoPE-mode table at 2x and as a 1:4 panorama")
    p.add_argument("--table", action="store_true", help="sweep steps x solver x schedule on the long form")
    p.add_argument("--table-num", type=int, default=24, help="prompts per cell of the table (the first of --num)")
    p.add_argument("--sheet", default=None, help="also write a contact sheet PNG")
    args = p.parse_args()
    forms = args.forms.split(",")
    for form in forms:
        if form not in shapes.FORMS:
            raise ValueError(f"--forms: unknown form {form!r}; expected some of {', '.join(shapes.FORMS)}")
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    pipe = TextToImagePipeline.from_pretrained(args.model)
    side = pipe.train_size
    print(f"# {args.num} held-out prompts per row, seed {args.seed}, MindSpore {ms.__version__} graph mode, CPU, "
          f"model trained at {side}x{side}; default settings {pipe.defaults}")  # fmt: skip
    print(f"| form / setting | prompts | {' | '.join(KEYS)} | s/image |")
    print("|---|---|" + "---|" * (len(KEYS) + 1))
    sheet = []
    if args.extrapolation:
        prompts = shapes.heldout_prompts(args.num, "plain", args.seed)
        base, sec, images = evaluate(pipe, prompts, pipe.defaults)
        print(row(f"{side}x{side} (training size)", len(prompts), base, sec), flush=True)
        for size_name, (h, w) in ((f"{2 * side}x{2 * side} (2x)", (2 * side, 2 * side)),
                                  (f"{4 * side}x{side} (1:4 panorama)", (side, 4 * side))):  # fmt: skip
            for mode, fields in MODES.items():
                settings = SampleSettings(**{**vars(pipe.defaults), "height": h, "width": w, **fields})
                acc, sec, images = evaluate(pipe, prompts, settings, chunk=12)
                print(row(f"{size_name}, {mode}", len(prompts), acc, sec), flush=True)
                sheet.append((f"{size_name}, RoPE {mode}", [(t, im, verdict(t, im)) for t, im in
                                                            zip(prompts[:4], images[:4])]))  # fmt: skip
    elif args.table:
        prompts = shapes.heldout_prompts(args.table_num, "full", args.seed)
        for n in (4, 8, 16, 32):
            for solver in ("euler", "midpoint"):
                for schedule in ("uniform", "shift", "sigmoid"):
                    settings = SampleSettings(**{**vars(pipe.defaults), "num_steps": n, "solver": solver,
                                                 "schedule": schedule})  # fmt: skip
                    acc, sec, _ = evaluate(pipe, prompts, settings)
                    print(row(f"full, {n} {solver} {schedule}", len(prompts), acc, sec), flush=True)
    else:
        for form in forms:
            prompts = shapes.heldout_prompts(args.num, form, args.seed)
            acc, sec, images = evaluate(pipe, prompts, pipe.defaults)
            print(row(form, len(prompts), acc, sec), flush=True)
            sheet.append((f"caption form: {form}", [(t, im, verdict(t, im)) for t, im in
                                                    zip(prompts[:6], images[:6])]))  # fmt: skip
    if args.sheet and sheet:
        contact_sheet(sheet, args.sheet)


if __name__ == "__main__":
    main()
