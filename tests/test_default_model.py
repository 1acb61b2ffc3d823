"""Regression test of the shipped default model (mindone_lumina/assets/shapes-demo): it loads strictly, stays under
20 MB, and a 32-step graph-mode generation for fixed prompts and seed has the shape colour and background the
detector expects. Not a retraining: the prompts are ones the shipped weights draw correctly at seed 0;
benchmarks/README.md has the held-out accuracy over 200 prompts."""

import os

import numpy as np

import mindspore as ms

from mindone_lumina import shapes
from mindone_lumina.pipeline import DEFAULT_MODEL, LuminaNextPipeline, SampleSettings

PROMPTS = [
    "a red circle on a blue background",
    "a large yellow square in the center on a black background",
    "a large white triangle in the center on a green background",
]


def test_default_model_is_small_and_follows_prompts():
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(DEFAULT_MODEL) for f in fs)
    assert size <= 20e6
    ms.set_context(mode=ms.GRAPH_MODE)
    pipe = LuminaNextPipeline.from_pretrained(DEFAULT_MODEL)
    out = pipe(PROMPTS, seed=0, settings=SampleSettings(num_steps=32), progress=False)
    assert out.images[0].size == (32, 32)
    detected = [shapes.detect(np.asarray(im)) for im in out.images]
    for prompt, got in zip(PROMPTS, detected):
        want = shapes.parse_prompt(prompt)
        # colours are what the shipped 53-minute model gets right (98.5% held out); its shape class (31%) is measured in
        # benchmarks/README.md, not asserted here
        assert (got["colour"], got["background"]) == (want["colour"], want["background"]), (prompt, got)
