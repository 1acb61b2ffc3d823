"""Write the synthetic shapes dataset: PNGs plus captions.jsonl, byte-identical for the same arguments.

python tools/make_shapes_dataset.py --out data/shapes --num 4000 [--size 32] [--seed 0] [--split train|heldout]
    [--variety] [--force]
"""

import argparse
import json
import os

import numpy as np
from PIL import Image

from mindone_lumina import shapes
from mindone_lumina.atomic import staged_folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, required=True)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument(
        "--variety",
        action="store_true",
        help="jitter each shape's size and position and vary the caption template (off: the canonical data the "
        "bundled model was trained on)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    if args.num < 1:
        raise ValueError(f"--num must be at least 1, got {args.num}")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        raise ValueError(f"{args.out} exists and is not empty; pass --force to replace it")
    scenes = (shapes.train_scenes if args.split == "train" else shapes.heldout_scenes)(args.num, args.seed)
    rng = np.random.default_rng([args.seed, 1]) if args.variety else None  # a stream apart from the scenes' draws
    with staged_folder(args.out, replace=args.force) as tmp, open(os.path.join(tmp, "captions.jsonl"), "w") as f:
        for i, scene in enumerate(scenes):
            Image.fromarray(shapes.render(scene, args.size, rng)).save(os.path.join(tmp, f"{i:05d}.png"))
            f.write(json.dumps({"image": f"{i:05d}.png", "caption": shapes.caption(scene, rng)}) + "\n")
    print(f"wrote {len(scenes)} {args.split} images to {args.out}")


if __name__ == "__main__":
    main()
