"""Draw the loss curve of a training log (the lines tools/train.py prints) as a PNG, with PIL only.

python benchmarks/plot_loss.py train.log docs/shapes-demo-loss.png
"""

import re
import sys

from PIL import Image, ImageDraw

LINE = re.compile(r"step (\d+)/\d+ loss ([0-9.]+)")


def main(log_path: str, out_path: str, width: int = 640, height: int = 360, pad: int = 50):
    with open(log_path) as f:
        points = [(int(m[1]), float(m[2])) for m in map(LINE.search, f) if m]
    if len(points) < 2:
        raise ValueError(f"{log_path}: fewer than two 'step N/M loss L' lines")
    steps, losses = zip(*points)
    top = max(losses) * 1.05
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    x = lambda s: pad + (s - steps[0]) / (steps[-1] - steps[0]) * (width - 2 * pad)  # noqa: E731
    y = lambda v: height - pad - v / top * (height - 2 * pad)  # noqa: E731
    draw.line([(pad, pad), (pad, height - pad), (width - pad, height - pad)], fill="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.text((5, y(frac * top) - 6), f"{frac * top:.2f}", fill="black")
    draw.text((width / 2 - 60, height - pad + 15), f"step ({steps[0]}-{steps[-1]})", fill="black")
    every = steps[1] - steps[0]
    draw.text((pad, 15), f"flow-matching loss (one batch, logged every {every} steps)", fill="black")
    draw.line([(x(s), y(v)) for s, v in points], fill=(200, 30, 30), width=2)
    im.save(out_path)
    print(f"wrote {out_path} ({len(points)} points, final loss {losses[-1]:.4f})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
