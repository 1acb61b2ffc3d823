"""Shared test helpers. Parity tests compare against the PyTorch reference (torch 2.13.0, diffusers 0.35.2,
transformers 4.57.1) with the relative Frobenius error ||ms - ref|| / ||ref||."""

import os

import numpy as np
import pytest

import mindspore as ms

from mindone_lumina import parity, sampling
from mindone_lumina.parity import randomize_torch_  # noqa: F401  (the tests import it from here)
from mindone_lumina.tolerances import BUDGETS  # noqa: F401  (the tests import it from here)

ms.set_device("CPU")
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
