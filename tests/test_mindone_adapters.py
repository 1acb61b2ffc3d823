"""The project's components inside mindone.diffusers 0.5.0 ``LuminaPipeline`` (CPU), and diffusers-layout saving
loaded by diffusers 0.35.2 (PyTorch), mindone and the project. Budgets: fp32 relative error <= 1e-5."""

import dataclasses
import os
import re

import numpy as np
import pytest
import torch
from conftest import BUDGETS, rel_err, tiny_diffusers_pipeline
from diffusers import AutoencoderKL, LuminaNextDiT2DModel, LuminaPipeline
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

import mindspore as ms
from mindspore import Tensor

from mindone_lumina.io import diffusers_io
from mindone_lumina.io import mindone as mindone_adapters
from mindone_lumina.models import nextdit
from mindone_lumina.models import vae as vae_lib
from mindone_lumina.pipeline import SampleSettings, TextToImagePipeline

BUDGET = BUDGETS["fp32"]["transformer"]
PROMPTS = ["a small red circle in the top left", "a large green square on a white background"]
HEIGHT, WIDTH = 64, 96  # beyond the tiny model's 64x64 training area: RoPE scaling and its time-aware switch act
README = os.path.join(os.path.dirname(__file__), "..", "README.md")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, folder = tiny_diffusers_pipeline(str(tmp_path_factory.mktemp("lumina-tiny")))
    return folder


@pytest.fixture(scope="module")
def ours(tiny):
    return TextToImagePipeline.from_pretrained(tiny)


def _noise(batch=len(PROMPTS)):
    return np.random.default_rng(0).standard_normal((batch, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


def _randomize_ms_(cell, seed: int, std: float = 0.1):
    """Every parameter random (zero-initialised gates and final layers included), so a missed key shows."""
    rng = np.random.default_rng(seed)
    for p in cell.get_parameters():
        p.set_data(Tensor((std * rng.standard_normal(p.shape)).astype(np.float32)))
    return cell


@pytest.mark.parametrize("linear, ntk", [(1.0, 1.0), (1.5, 1.0), (1.0, 2.25)])
def test_portable_rope_table_is_diffusers_table(linear, ntk):
    ours = mindone_adapters.portable_rope_table(16, 384, 384, linear_factor=linear, ntk_factor=ntk).asnumpy()
    ref = get_2d_rotary_pos_embed_lumina(16, 384, 384, linear_factor=linear, ntk_factor=ntk).numpy()
    assert ours.shape == ref.shape and ours.dtype == np.complex64
    assert np.abs(ours - ref).max() <= 1e-4  # angles up to 383 rad in float32; the tables agree to rounding


def test_mindone_pipeline_equals_project_euler(ours, mode):
    pipe = mindone_adapters.mindone_pipeline(ours)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=5, guidance_scale=4.0, clean_caption=False)
    latents = pipe(PROMPTS, latents=Tensor(_noise()), output_type="latent", **kwargs)[0].asnumpy()
    images = pipe(PROMPTS, latents=Tensor(_noise()), output_type="pil", **kwargs)[0]

    grid = 1.0 - pipe.scheduler.sigmas.asnumpy().astype(np.float64)  # mindone's sigma grid in Lumina time
    settings = SampleSettings(height=HEIGHT, width=WIDTH, solver="euler", guidance_scale=4.0, scaling="always",
                              scale_watershed=1.0)  # the diffusers-family pipeline's defaults  # fmt: skip
    out = ours(PROMPTS, "", latents=_noise(), grid=grid, settings=settings, progress=False)
    assert rel_err(latents, out.latents) <= BUDGET
    assert len(images) == len(PROMPTS) and images[0].size == (WIDTH, HEIGHT)
    pixels = np.stack([np.asarray(im, np.float32) for im in images])
    assert np.abs(pixels - np.stack([np.asarray(im, np.float32) for im in out.images])).mean() <= 1.0


def test_adapters_expose_what_the_pipeline_reads(ours):
    pipe = mindone_adapters.mindone_pipeline(ours)
    assert pipe.transformer.config.sample_size == 8 and pipe.transformer.config.in_channels == 4
    assert pipe.transformer.head_dim == 16 and pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    assert pipe.text_encoder.dtype == ms.float32
    ids = Tensor(np.array([[2, 10, 11, 0]], np.int64))
    hidden = pipe.text_encoder(ids, attention_mask=Tensor(np.array([[1, 1, 1, 0]])), output_hidden_states=True)
    assert hidden.hidden_states[-2].shape == (1, 4, 32)
    with pytest.raises(IndexError, match=r"hidden_states\[-2\] only"):
        hidden.hidden_states[-1]


def test_pixel_space_pipeline_is_refused():
    class PixelPipe:
        vae = None

    with pytest.raises(ValueError, match="needs a VAE"):
        mindone_adapters.mindone_pipeline(PixelPipe())


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_saved_transformer_loads_in_diffusers(tmp_path, learn_sigma):
    cfg = nextdit.NextDiTConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, multiple_of=16, cap_feat_dim=24,
                                in_channels=4, learn_sigma=learn_sigma, qk_norm=True)  # fmt: skip
    model = _randomize_ms_(nextdit.NextDiT(cfg), seed=3)
    folder = str(tmp_path / "transformer")
    diffusers_io.save_component("transformer", folder, model, sample_size=16)
    ref = LuminaNextDiT2DModel.from_pretrained(folder).eval()

    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 8, 12)).astype(np.float32)
    t = np.array([0.2, 0.7], np.float32)
    cap = rng.standard_normal((2, 6, 24)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], np.int32)
    got = nextdit.forward(model, *map(Tensor, (x, t, cap, mask))).asnumpy()
    rope = get_2d_rotary_pos_embed_lumina(ref.head_dim, 384, 384)
    with torch.no_grad():
        args = (torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cap), torch.from_numpy(mask), rope)
        want = ref(*args, cross_attention_kwargs={}, return_dict=False)[0][:, :4].numpy()
    assert rel_err(got, want) <= BUDGET


def test_saved_vae_loads_in_diffusers(tmp_path):
    cfg = vae_lib.VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)
    vae = _randomize_ms_(vae_lib.AutoencoderKL(cfg), seed=5, std=0.2)
    folder = str(tmp_path / "vae")
    diffusers_io.save_component("vae", folder, vae)
    ref = AutoencoderKL.from_pretrained(folder).eval()
    z = np.random.default_rng(6).standard_normal((1, 4, 8, 8)).astype(np.float32)
    got = vae.decode(Tensor(z)).asnumpy()
    with torch.no_grad():
        want = ref.decode(torch.from_numpy(z), return_dict=False)[0].numpy()
    assert rel_err(got, want) <= BUDGET


def test_saved_pipeline_loads_in_diffusers_mindone_and_the_project(ours, tmp_path):
    folder = str(tmp_path / "saved")
    ours.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["mindone_lumina.json", "model_index.json", "scheduler", "text_encoder",
                                          "tokenizer", "transformer", "vae"]  # fmt: skip
    with pytest.raises(ValueError, match="not empty"):
        ours.save_pretrained(folder)

    ref = LuminaPipeline.from_pretrained(folder)  # PyTorch diffusers reads every component
    assert isinstance(ref.transformer, LuminaNextDiT2DModel) and ref.transformer.config.sample_size == 8
    # mindone's own classes read the components (its GemmaModel cannot load on CPU: mint.arange has no CPU kernel)
    from mindone.diffusers import AutoencoderKL as MindoneAutoencoderKL
    from mindone.diffusers import LuminaNextDiT2DModel as MindoneNextDiT

    theirs = MindoneNextDiT.from_pretrained(os.path.join(folder, "transformer"))
    theirs_vae = MindoneAutoencoderKL.from_pretrained(os.path.join(folder, "vae"))
    for mine, torch_model in ((theirs, ref.transformer), (theirs_vae, ref.vae)):
        got = {k: v.asnumpy() for k, v in mine.parameters_dict().items()}
        want = {k: v.numpy() for k, v in torch_model.state_dict().items()}
        assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)

    again = TextToImagePipeline.from_pretrained(folder)
    assert again.defaults == ours.defaults
    settings = SampleSettings(height=HEIGHT, width=WIDTH, num_steps=3, solver="euler")
    a = ours(PROMPTS, latents=_noise(), settings=settings, progress=False).latents
    b = again(PROMPTS, latents=_noise(), settings=settings, progress=False).latents
    assert np.array_equal(a, b)

    # defaults beyond the usual five (RoPE mode, Context Drop) are saved too
    original = ours.defaults
    ours.defaults = dataclasses.replace(original, smooth_rope=True, context_drop=2, context_drop_until=0.5)
    try:
        ours.save_pretrained(str(tmp_path / "changed"))
    finally:
        ours.defaults = original
    changed = TextToImagePipeline.from_pretrained(str(tmp_path / "changed")).defaults
    assert (changed.smooth_rope, changed.context_drop, changed.context_drop_until) == (True, 2, 0.5)


def test_readme_use_with_mindone_example_runs(tiny, tmp_path, monkeypatch):
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Use with mindone") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"Lumina-Next-SFT-diffusers"' in code and "num_inference_steps=30" in code
    code = code.replace('"Lumina-Next-SFT-diffusers"', repr(tiny)).replace(
        "num_inference_steps=30", "num_inference_steps=2"
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert os.path.isfile("lumina-mindone.png")
    assert os.path.isfile(os.path.join("lumina-saved", "model_index.json"))
