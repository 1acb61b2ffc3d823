"""Write the synthetic shapes dataset: PNGs plus captions.jsonl, byte-identical for the same arguments.

python tools/make_shapes_dataset.py --out data/shapes --num 4000 [--size 64] [--aspect-ratios 1,0.5,2] [--seed 0]
    [--split train|heldout] [--shape hexagon] [--variety] [--force]

Each image is drawn at one aspect-ratio bucket of about ``size``^2 pixels (sides multiples of 8, the default
model's token), chosen uniformly from ``--aspect-ratios`` (width / height).

Without ``--shape``: the default model's data set (``shapes.train_scenes`` / ``shapes.heldout_scenes``: circles,
squares, triangles). ``--shape hexagon``: a new concept's data set for a fine-tune to teach it, every scene of that
shape (``shapes.concept_train_scenes``: every colour pair but ``shapes.CONCEPT_HELDOUT``; with ``--split heldout``
``shapes.concept_heldout_scenes``: those pairs only), drawn and captioned the same way.
"""

import json
import os

import numpy as np
from PIL import Image

from mindone_lumina import cli, shapes
from mindone_lumina.atomic import staged_folder
from mindone_lumina.training.data import buckets


def parser():
    p = cli.Parser(description=__doc__)
    p.add_argument("--out", required=True, help="folder to create (absent or empty unless --force)")
    p.add_argument("--num", type=cli.integer(1), required=True, help="number of images")
    p.add_argument("--size", type=cli.integer(8), default=32, help="pixels per side of the bucket area")
    p.add_argument("--aspect-ratios", default="1", help="comma-separated width/height ratios")
    p.add_argument("--seed", type=cli.seed, default=0, help="seed of the scenes (and of --variety's draws)")
    p.add_argument("--split", default="train", choices=["train", "heldout"],
                   help="scenes of the training combinations or the held-out ones")  # fmt: skip
    p.add_argument("--shape", choices=shapes.NEW_SHAPES,
                   help="a new concept's scenes, that shape only (default: the default model's circles, squares and "
                   "triangles)")  # fmt: skip
    p.add_argument(
        "--variety",
        action="store_true",
        help="jitter each shape's size and position and vary the caption form and phrasing (as the bundled model "
        "was trained; default: off: every caption in the canonical long form, no jitter)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        ratios = [float(r) for r in args.aspect_ratios.split(",")]
    except ValueError:
        raise ValueError(f"--aspect-ratios must be comma-separated numbers, got {args.aspect_ratios!r}") from None
    if any(r <= 0 for r in ratios):
        raise ValueError(f"--aspect-ratios must be positive, got {args.aspect_ratios!r}")
    sizes = [buckets(args.size, [r], 8)[0] for r in ratios]
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        raise ValueError(f"{args.out} exists and is not empty; pass --force to replace it")
    cli.output_folder(args.out, "--out")
    if args.shape is None:
        scenes = (shapes.train_scenes if args.split == "train" else shapes.heldout_scenes)(args.num, args.seed)
    else:
        concept = shapes.concept_train_scenes if args.split == "train" else shapes.concept_heldout_scenes
        scenes = concept(args.num, args.seed, args.shape)
    rng = np.random.default_rng([args.seed, 1]) if args.variety else None  # a stream apart from the scenes' draws
    pick = np.random.default_rng([args.seed, 2]).integers(len(sizes), size=len(scenes))  # and apart from those
    with staged_folder(args.out, replace=args.force) as tmp, open(os.path.join(tmp, "captions.jsonl"), "w") as f:
        for i, scene in enumerate(scenes):
            Image.fromarray(shapes.render(scene, sizes[pick[i]], rng)).save(os.path.join(tmp, f"{i:05d}.png"))
            f.write(json.dumps({"image": f"{i:05d}.png", "caption": shapes.caption(scene, rng)}) + "\n")
    print(f"wrote {len(scenes)} {args.split} images{'' if args.shape is None else ' of ' + args.shape} to {args.out}")


if __name__ == "__main__":
    cli.run(main)
