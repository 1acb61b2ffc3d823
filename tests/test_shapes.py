"""The shapes dataset and its detector: determinism, the held-out split, captions read back by the prompt parser, and
detector accuracy on clean, degraded and jittered renderings (the measuring stick of the bundled default model)."""

import json

import numpy as np
import pytest
from conftest import load_tool
from scipy import ndimage

from mindone_lumina import shapes


def test_deterministic():
    a, b = shapes.train_scenes(500, seed=3), shapes.train_scenes(500, seed=3)
    assert a == b and a != shapes.train_scenes(500, seed=4)
    r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
    for scene in a[:50]:
        assert np.array_equal(shapes.render(scene, 32, r1), shapes.render(scene, 32, r2))
        assert shapes.caption(scene, r1) == shapes.caption(scene, r2)
    assert np.array_equal(shapes.render(a[0]), shapes.render(a[0]))  # canonical: no rng, no jitter
    assert shapes.render(a[0], 64).shape == (64, 64, 3) and shapes.render(a[0]).dtype == np.uint8


def test_heldout_never_in_training_and_every_word_seen():
    assert len(shapes.HELDOUT) == 13 and len(shapes.TRIPLES) == 90
    train = {(s.shape, s.colour, s.background) for s in shapes.train_scenes(5000, seed=0)}
    assert not train & shapes.HELDOUT
    assert train == set(shapes.TRIPLES) - shapes.HELDOUT  # 5000 draws over 77 combinations reach all of them
    assert {s for s, _, _ in train} == set(shapes.SHAPES)
    assert {c for _, c, _ in train} == set(shapes.COLOURS) == {b for _, _, b in train}
    heldout = shapes.heldout_scenes(500, seed=1)
    assert {(s.shape, s.colour, s.background) for s in heldout} == shapes.HELDOUT
    assert {s.size for s in heldout} == set(shapes.SIZES) and {s.position for s in heldout} == set(shapes.POSITIONS)


def test_scene_rejects_unknown_words():
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        shapes.Scene("circle", "pink", "blue")
    with pytest.raises(ValueError, match="both 'red'"):
        shapes.Scene("circle", "red", "red")
    with pytest.raises(ValueError, match="below 16 px"):
        shapes.render(shapes.Scene("circle", "red", "blue"), size=8)


def test_caption_round_trip_in_every_form_and_phrasing():
    rng = np.random.default_rng(0)
    forms, phrasings = {}, set()
    for scene in shapes.train_scenes(400, seed=2):
        assert shapes.parse_prompt(shapes.caption(scene)) == vars(scene)  # the canonical caption names everything
        text = shapes.caption(scene, rng)
        parsed = shapes.parse_prompt(text)
        assert {k: getattr(scene, k) for k in parsed} == parsed and {"shape", "colour", "background"} <= set(parsed)
        form = {(False, False): "plain", (True, False): "size", (False, True): "position", (True, True): "full"}[
            ("size" in parsed, "position" in parsed)
        ]
        forms[form] = forms.get(form, 0) + 1
        phrasings.add(next(m for m in (", ", " background with ", " against ", " background", " on ") if m in text))
    for form, share in shapes.FORMS.items():  # each form near its share of the captions
        assert abs(forms[form] / 400 - share) < 0.07, forms
    assert shapes.caption(shapes.Scene("circle", "red", "blue"), form="plain") == "a red circle on a blue background"
    assert len(phrasings) == len(shapes.PHRASINGS), phrasings
    for text in ("red circle, blue background", "a blue background with a small red circle in the top left",
                 "a red circle against blue", "a red circle on blue"):  # fmt: skip
        parsed = shapes.parse_prompt(text)
        assert (parsed["colour"], parsed["shape"], parsed["background"]) == ("red", "circle", "blue"), text
    with pytest.raises(ValueError, match="unknown caption form"):
        shapes.caption(shapes.Scene("circle", "red", "blue"), form="tiny")
    assert shapes.heldout_prompts(5, "plain") == shapes.heldout_prompts(5, "plain")
    assert all("in the" not in p for p in shapes.heldout_prompts(20, "size"))
    assert shapes.parse_prompt("A Blue background, with a small RED triangle")["colour"] == "red"
    assert shapes.parse_prompt("a white square on black")["background"] == "black"
    with pytest.raises(ValueError, match="names 0 shapes"):
        shapes.parse_prompt("a red thing on blue")
    with pytest.raises(ValueError, match="names 2 shapes"):
        shapes.parse_prompt("a red circle and a square on blue")
    with pytest.raises(ValueError, match="needs a colour"):
        shapes.parse_prompt("a red circle")


def test_render_at_aspect_ratios_and_sizes_detects_one_shape():
    rng = np.random.default_rng(3)
    for size in ((64, 64), (48, 88), (88, 48), (128, 128), (64, 256)):
        scenes = shapes.train_scenes(30, seed=1)
        images = [shapes.render(s, size, rng) for s in scenes]
        assert images[0].shape == (*size, 3)
        acc = shapes.score([shapes.caption(s) for s in scenes], images)
        assert acc.pop("duplicated") == 0 and min(acc.values()) == 1.0, (size, acc)
    two = np.concatenate([shapes.render(shapes.Scene("square", "red", "blue", "small"), 32)] * 2, axis=1)
    assert shapes.detect(two)["count"] == 2
    assert shapes.score(["a red square on blue"], [two])["duplicated"] == 1.0


def _degrade(image, rng):
    """A 3x3 box blur plus gaussian noise of 8/255: roughly how far a decent generated image is from a clean one."""
    blurred = ndimage.uniform_filter(image.astype(np.float32), size=(3, 3, 1))
    return np.clip(blurred + rng.normal(0, 8, image.shape), 0, 255)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("jitter", [False, True])
def test_detector_on_clean_and_degraded_images(size, jitter):
    scenes = shapes.train_scenes(240, seed=4) + shapes.heldout_scenes(80, seed=5)
    rng = np.random.default_rng(size)
    prompts = [shapes.caption(s) for s in scenes]
    images = [shapes.render(s, size, rng if jitter else None) for s in scenes]
    clean = shapes.score(prompts, images)
    assert clean.pop("duplicated") == 0 and min(clean.values()) >= 0.99, clean  # measured 1.0 on 1000 scenes per case
    degraded = shapes.score(prompts, [_degrade(im, rng) for im in images])
    assert degraded.pop("duplicated") == 0 and min(degraded.values()) >= 0.95, degraded  # measured 1.0, also at noise
    # 16/255 or a 5x5 blur


def test_detector_ignores_stray_blobs():
    rng = np.random.default_rng(1)
    scenes = shapes.train_scenes(100, seed=6)
    images = []
    for scene in scenes:
        im = _degrade(shapes.render(scene), rng)
        for _ in range(3):  # 2x2 specks of the shape's colour, as a sampler leaves them
            y, x = rng.integers(0, 30, size=2)
            im[y : y + 2, x : x + 2] = shapes.COLOURS[scene.colour]
        images.append(im)
    acc = shapes.score([shapes.caption(s) for s in scenes], images)
    assert acc.pop("duplicated") == 0 and min(acc.values()) >= 0.95, acc  # specks are no second shape


def test_detector_rejects_formless_blobs():
    """Blobs (thresholded smooth noise, like an undertrained model's output) must not earn one class for free."""
    rng = np.random.default_rng(0)
    verdicts = []
    for _ in range(100):
        field = ndimage.gaussian_filter(rng.normal(size=(32, 32)), 3)
        blob = (field > np.quantile(field, 0.7))[..., None]
        verdicts.append(shapes.detect(np.where(blob, shapes.COLOURS["red"], shapes.COLOURS["blue"]))["shape"])
    assert verdicts.count(None) >= 50, verdicts  # measured 65% of 200
    assert max(verdicts.count(s) for s in shapes.SHAPES) <= 30, verdicts  # measured at most 20%


def test_detector_without_a_shape():
    blank = np.full((32, 32, 3), shapes.COLOURS["green"], np.uint8)
    assert shapes.detect(blank) == {
        "background": "green",
        "colour": None,
        "shape": None,
        "size": None,
        "position": None,
        "count": 0,
    }


def test_dataset_cli(tmp_path):
    make = load_tool("make_shapes_dataset").main
    out, again = tmp_path / "shapes", tmp_path / "again"
    make(["--out", str(out), "--num", "12", "--seed", "1", "--variety"])
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and sorted(p.name for p in out.glob("*.png")) == [r["image"] for r in rows]
    make(["--out", str(again), "--num", "12", "--seed", "1", "--variety"])
    assert all(
        (out / f).read_bytes() == (again / f).read_bytes() for f in [r["image"] for r in rows] + ["captions.jsonl"]
    )
    with pytest.raises(ValueError, match="exists and is not empty"):
        make(["--out", str(out), "--num", "3"])
    make(["--out", str(out), "--num", "3", "--split", "heldout", "--force"])
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and len(list(out.glob("*.png"))) == 3
    parsed = [shapes.parse_prompt(r["caption"]) for r in rows]
    assert all((p["shape"], p["colour"], p["background"]) in shapes.HELDOUT for p in parsed)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left behind
