"""The shapes dataset and its detector: determinism, the held-out split, and detector accuracy on clean and degraded
renderings (the measuring stick of the bundled default model)."""

import json

import numpy as np
import pytest
from conftest import load_tool
from scipy import ndimage

from mindone_lumina import shapes


def test_deterministic_and_heldout_never_in_training():
    a, b = shapes.train_scenes(500, seed=3), shapes.train_scenes(500, seed=3)
    assert a == b and np.array_equal(shapes.render(a[0]), shapes.render(b[0]))
    train = shapes.train_scenes(3000, seed=0)
    seen = {(s.shape, s.colour, s.background) for s in train}
    assert not seen & shapes.HELDOUT
    assert {s for s, _, _ in seen} == set(shapes.SHAPES)
    assert {c for _, c, _ in seen} == set(shapes.COLOURS) == {b for _, _, b in seen}
    assert all((s.shape, s.colour, s.background) in shapes.HELDOUT for s in shapes.heldout_scenes(200, seed=1))


def test_caption_round_trip():
    for scene in shapes.train_scenes(100, seed=2):
        parsed = shapes.parse_prompt(shapes.caption(scene))
        assert parsed == {"shape": scene.shape, "colour": scene.colour, "background": scene.background}
    assert shapes.parse_prompt("a red circle on a blue background")["colour"] == "red"
    with pytest.raises(ValueError, match="no shape"):
        shapes.parse_prompt("a red thing on blue")


@pytest.mark.parametrize("size", [32, 64])
def test_detector_on_clean_and_degraded_images(size):
    scenes = shapes.train_scenes(300, seed=4) + shapes.heldout_scenes(300, seed=5)
    prompts = [shapes.caption(s) for s in scenes]
    images = [shapes.render(s, size) for s in scenes]
    clean = shapes.score(prompts, images)
    assert min(clean.values()) >= 0.99, clean
    rng = np.random.default_rng(0)
    degraded = [
        np.clip(ndimage.uniform_filter(im.astype(np.float32), size=(3, 3, 1)) + rng.normal(0, 8, im.shape), 0, 255)
        for im in images
    ]  # 3x3 box blur plus gaussian noise of 8/255
    noisy = shapes.score(prompts, degraded)
    assert min(noisy.values()) >= 0.95, noisy


def test_dataset_cli(tmp_path):
    make = load_tool("make_shapes_dataset").main
    out = tmp_path / "shapes"
    make(["--out", str(out), "--num", "12", "--seed", "1"])
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all((out / r["image"]).is_file() for r in rows)
    with pytest.raises(ValueError, match="exists and is not empty"):
        make(["--out", str(out), "--num", "3"])
