"""Prompt-following of the bundled default model on held-out shape/colour/background combinations.

    python benchmarks/eval_shapes.py [--model DIR] [--num 240] [--table]

Prompts are captions of ``shapes.heldout_scenes`` (combinations never seen in training); the deterministic detector
(``shapes.detect``) reads background colour, shape colour and shape class back from each generated image. Without
``--table`` it scores the default settings; ``--table`` sweeps steps x solver x schedule and reports seconds/image.
"""

import argparse
import time

import numpy as np

import mindspore as ms

from mindone_lumina import shapes
from mindone_lumina.pipeline import DEFAULT_MODEL, LuminaNextPipeline, SampleSettings


def evaluate(pipe, prompts, settings: SampleSettings, seed: int = 0):
    start = time.perf_counter()
    out = pipe(prompts, seed=seed, settings=settings, progress=False)
    seconds = (time.perf_counter() - start) / len(prompts)
    return shapes.score(prompts, [np.asarray(im) for im in out.images]), seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--num", type=int, default=240)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    pipe = LuminaNextPipeline.from_pretrained(args.model)
    prompts = [shapes.caption(s) for s in shapes.heldout_scenes(args.num, seed=args.seed)]
    evaluate(pipe, prompts[:2], SampleSettings(num_steps=2))  # compile outside the timings
    print(f"# {args.num} held-out prompts, seed {args.seed}, MindSpore {ms.__version__} graph mode, CPU")
    print("| steps | solver | schedule | background | shape colour | shape class | s/image |")
    print("|---|---|---|---|---|---|---|")
    grid = [(30, "midpoint", "shift")]  # the default settings
    if args.table:
        grid += [
            (n, so, sc)
            for n in (4, 8, 16, 32)
            for so in ("euler", "midpoint")
            for sc in ("uniform", "shift", "sigmoid")
        ]
    for steps, solver, schedule in grid:
        acc, sec = evaluate(pipe, prompts, SampleSettings(num_steps=steps, solver=solver, schedule=schedule))
        print(f"| {steps} | {solver} | {schedule} | {acc['background']:.1%} | {acc['colour']:.1%} "
              f"| {acc['shape']:.1%} | {sec:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
