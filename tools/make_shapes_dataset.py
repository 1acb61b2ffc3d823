"""Write the synthetic shapes dataset: PNGs plus captions.jsonl, deterministic for a seed.

python tools/make_shapes_dataset.py --out data/shapes --num 4000 [--size 32] [--seed 0] [--split train|heldout]
"""

import argparse
import json
import os
import shutil
import tempfile

from PIL import Image

from mindone_lumina import shapes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, required=True)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        raise ValueError(f"{args.out} exists and is not empty; pass --force to replace it")
    scenes = (shapes.train_scenes if args.split == "train" else shapes.heldout_scenes)(args.num, args.seed)
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".shapes-")
    with open(os.path.join(tmp, "captions.jsonl"), "w") as f:
        for i, scene in enumerate(scenes):
            Image.fromarray(shapes.render(scene, args.size)).save(os.path.join(tmp, f"{i:05d}.png"))
            f.write(json.dumps({"image": f"{i:05d}.png", "caption": shapes.caption(scene)}) + "\n")
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    print(f"wrote {len(scenes)} {args.split} images to {args.out}")


if __name__ == "__main__":
    main()
