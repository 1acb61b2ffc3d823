"""Draw the loss curves of training logs (the lines tools/train.py and tools/train_vae.py print) as one PNG, PIL only.

python benchmarks/plot_loss.py docs/shapes-demo-loss.png runs/vae.log="VAE (MSE + KL)" \\
    runs/dit.log="Next-DiT (flow matching)"

One panel per log, stacked; a log's title follows ``=`` (default: its file name).
"""

import re
import sys

from PIL import Image, ImageDraw

LINE = re.compile(r"step (\d+)/\d+ loss ([0-9.]+)")


def read_points(log_path: str) -> list:
    with open(log_path) as f:
        points = [(int(m[1]), float(m[2])) for m in map(LINE.search, f) if m]
    if len(points) < 2:
        raise ValueError(f"{log_path}: fewer than two 'step N/M loss L' lines")
    return points


def draw_panel(draw, points: list, title: str, top_y: int, width: int, height: int, pad: int = 50):
    steps, losses = zip(*points)
    top = max(losses) * 1.05
    x = lambda s: pad + (s - steps[0]) / (steps[-1] - steps[0]) * (width - 2 * pad)  # noqa: E731
    y = lambda v: top_y + height - pad - v / top * (height - 2 * pad)  # noqa: E731
    draw.line([(pad, top_y + pad), (pad, top_y + height - pad), (width - pad, top_y + height - pad)], fill="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.text((5, y(frac * top) - 6), f"{frac * top:.3f}", fill="black")
    draw.text((width / 2 - 60, top_y + height - pad + 15), f"step ({steps[0]}-{steps[-1]})", fill="black")
    every = steps[1] - steps[0]
    draw.text((pad, top_y + 15), f"{title}: loss of one batch, logged every {every} steps", fill="black")
    draw.line([(x(s), y(v)) for s, v in points], fill=(200, 30, 30), width=2)


def main(out_path: str, *logs: str, width: int = 640, height: int = 300):
    if not logs:
        raise ValueError("name at least one training log")
    panels = []
    for spec in logs:
        path, _, title = spec.partition("=")
        panels.append((read_points(path), title or path))
    im = Image.new("RGB", (width, height * len(panels)), "white")
    draw = ImageDraw.Draw(im)
    for i, (points, title) in enumerate(panels):
        draw_panel(draw, points, title, i * height, width, height)
    im.save(out_path)
    finals = ", ".join(f"{title} {points[-1][1]:.4f}" for points, title in panels)
    print(f"wrote {out_path} (final losses: {finals})")


if __name__ == "__main__":
    main(*sys.argv[1:])
