"""Shared test helpers. Parity tests compare against the PyTorch reference (torch 2.13.0, diffusers 0.35.2,
transformers 4.57.1) with the relative Frobenius error ||ms - ref|| / ||ref||."""

import json
import os

import numpy as np
import pytest
import yaml
from PIL import Image

import mindspore as ms

from mindone_lumina import backend, parity, sampling
from mindone_lumina.models import nextdit
from mindone_lumina.parity import randomize_torch_  # noqa: F401  (the tests import it from here)
from mindone_lumina.tolerances import BUDGETS  # noqa: F401  (the tests import it from here)
from mindone_lumina.weights.load import cell_specs
from mindone_lumina.weights.nextdit import NEXTDIT

backend.set_device("CPU")  # what every tool does
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


def rel_err(actual, reference) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    return float(np.linalg.norm(actual - reference) / np.linalg.norm(reference))


@pytest.fixture(autouse=True)
def _restore_mode():
    """Every test leaves MindSpore's execution mode as it found it, whatever it or the code under test sets."""
    previous = ms.get_context("mode")
    yield
    ms.set_context(mode=previous)


@pytest.fixture(params=list(MODES))
def mode(request):
    """Run the test in MindSpore graph mode and in PyNative."""
    ms.set_context(mode=MODES[request.param])
    return request.param


@pytest.fixture
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


def forward_with_cfg(family, model, x, t, cap_feats, cap_mask, cfg_scale, scaling=None, guided_channels=3):
    """The original ``forward_with_cfg`` of a DiT family module (``models.nextdit`` / ``models.flagdit``)."""
    scaling = family.RopeScaling() if scaling is None else scaling
    run = lambda x2: family.forward(model, x2, t, cap_feats, cap_mask, scaling)  # noqa: E731
    return sampling.forward_with_cfg(run, x, cfg_scale, guided_channels)


SENTENCES = [
    "a small red circle in the top left on a blue background",
    "a large green square in the center on a white background",
    "ein kleiner roter Kreis auf blauem Hintergrund",
    "一个红色的圆圈在蓝色的背景上",
    "a happy dog 🐶 under the sun ☀️",
]


def load_tool(name: str):
    """The module of ``tools/<name>.py`` (tools/ is a folder of scripts, not a package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(FIXTURES), os.pardir, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tools_{name}", os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_diffusers_pipeline(folder: str):
    """Tiny random diffusers ``LuminaPipeline`` (Gemma, 2-block Next-DiT, 8x VAE) saved in the diffusers layout under
    ``folder/pipe``; returns (pipeline, that folder)."""
    path = parity.build_tiny_model(folder, seed=0, num_layers=2, texts=SENTENCES)
    return parity.load_reference(path), path


# ------------------------------------------------------------------------------------------------------------------
# Training: a two-image data set (plus a broken and a too-small image) and its tiny text encoder
# ------------------------------------------------------------------------------------------------------------------
TINY = {"dim": 32, "n_layers": 2, "n_heads": 2, "multiple_of": 16, "cap_feat_dim": 32, "in_channels": 3,
        "patch_size": 2, "qk_norm": True}  # fmt: skip


@pytest.fixture(scope="module")
def data_and_encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    data.mkdir()
    rows = []
    for i, (name, rgb) in enumerate([("red", (220, 40, 40)), ("blue", (40, 70, 220))]):
        img = np.full((16, 16, 3), 255 - np.array(rgb), np.uint8)
        img[4:12, 4:12] = rgb
        Image.fromarray(img).save(data / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a {name} square"})
    (data / "broken.png").write_bytes(b"not a png")
    rows.append({"image": "broken.png", "caption": "a broken image"})
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(data / "tiny.png")  # below the 16x16 bucket
    rows.append({"image": "tiny.png", "caption": "a tiny image"})
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoder = root / "text_encoder"
    args = ["--captions", str(data / "captions.jsonl"), "--out", str(encoder), "--hidden", "32", "--layers", "2"]
    load_tool("make_text_encoder").main(args + ["--heads", "2", "--vocab", "300"])
    return str(data), str(encoder)


def recipe(tmp_path, data_and_encoder, **kw):
    data, encoder = data_and_encoder
    raw = {"data": data, "output": str(tmp_path / "run"), "model": TINY, "text_encoder": encoder, "resolution": 16,
           "batch_size": 2, "steps": 200, "lr": 3e-3, "caption_dropout": 0.0, "ema_decay": 0.9, "save_every": 100,
           "log_every": 100, **kw}  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(path, weights) of a Next-DiT of the TINY recipe with random non-zero weights (a trained model's adaLN and
    output layers are not zero, so every LoRA adapter gets gradients), saved as the project's safetensors."""
    cfg = nextdit.resolve_config(TINY)
    model = nextdit.NextDiT(cfg)
    rng = np.random.default_rng(0)
    for name, p in model.parameters_and_names():  # norms near 1, the rest near 0
        value = rng.standard_normal(p.shape).astype(np.float32) * 0.1 + (1.0 if "norm" in name else 0.0)
        p.set_data(ms.Tensor(value))
    path = str(tmp_path_factory.mktemp("base") / "base.safetensors")
    NEXTDIT.write(cell_specs(model), cfg, path)
    return path, {n: p.asnumpy() for n, p in model.parameters_and_names()}
