"""Text-to-image pipeline against diffusers==0.35.2 ``LuminaPipeline`` (Euler, diffusers' grid and RoPE settings)
and against an independent torch re-implementation of the original sampler (midpoint, shift 4, watershed 0.3,
proportional attention). Budgets: final latents fp32 relative error <= 1e-4, decoded images <= 1/255 mean abs."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import BUDGETS, load_tool, rel_err, tiny_diffusers_pipeline
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

import mindspore as ms

from mindone_lumina import sampling
from mindone_lumina.models.nextdit import SharedBlockNextDiT
from mindone_lumina.pipeline import SampleSettings, TextToImagePipeline

LATENT_BUDGET, PIXEL_BUDGET = BUDGETS["fp32"]["sampling"], 1.0 / 255
PROMPTS = ["a small red circle in the top left", "a large green square on a white background"]
HEIGHT, WIDTH = 64, 96  # beyond the 64x64 training area of the tiny model, so RoPE scaling is active


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return tiny_diffusers_pipeline(str(tmp_path_factory.mktemp("lumina-tiny")))


@pytest.fixture(scope="module")
def ours(reference):
    return TextToImagePipeline.from_pretrained(reference[1])


def _noise(seed=0):
    return np.random.default_rng(seed).standard_normal((len(PROMPTS), 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


def test_from_pretrained_reads_the_diffusers_layout(ours):
    assert ours.train_size == 64 and ours.size_multiple == 16
    assert ours.transformer.cfg.cap_feat_dim == ours.text_encoder.cfg.hidden_size == 32


def test_euler_matches_diffusers_pipeline(reference, ours, mode):
    pipe, _ = reference
    noise = _noise()
    kwargs = dict(prompt=PROMPTS, negative_prompt="", height=HEIGHT, width=WIDTH, num_inference_steps=6,
                  guidance_scale=4.0, clean_caption=False, return_dict=False)  # fmt: skip
    with torch.no_grad():
        ref_latents = pipe(latents=torch.from_numpy(noise), output_type="latent", **kwargs)[0].numpy()
        ref_images = pipe(latents=torch.from_numpy(noise), output_type="np", **kwargs)[0]
    grid = 1.0 - pipe.scheduler.sigmas.double().numpy()  # diffusers' sigma grid in Lumina time (0 noise, 1 data)
    settings = SampleSettings(height=HEIGHT, width=WIDTH, solver="euler", guidance_scale=4.0, scaling="always",
                              scale_watershed=1.0)  # diffusers' defaults  # fmt: skip
    out = ours(PROMPTS, "", latents=noise, grid=grid, settings=settings, progress=False)
    assert rel_err(out.latents, ref_latents) <= LATENT_BUDGET
    images = np.stack([np.asarray(im, np.float32) / 255.0 for im in out.images])
    assert np.abs(images - ref_images).mean() <= PIXEL_BUDGET


def _original_sampler(transformer, noise, cap, mask, steps, scale, watershed, base_seqlen, cfg_scale=4.0):
    """Independent re-implementation: torchdiffeq fixed-grid midpoint on linspace(0, 1, steps) shifted by 4, the
    original's hard time-aware RoPE switch on t[0], proportional attention, guidance on channels 0-2."""
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    t = t / (t + 4.0 - 4.0 * t)
    x = torch.from_numpy(noise)
    b = x.shape[0]

    def velocity(x, ti):
        linear, ntk = (scale, 1.0) if ti < watershed else (1.0, scale)
        rope = get_2d_rotary_pos_embed_lumina(transformer.head_dim, 384, 384, linear_factor=linear, ntk_factor=ntk)
        kwargs = {"base_sequence_length": base_seqlen}
        t_vec = torch.full((2 * b,), ti, dtype=torch.float32)
        out = transformer(torch.cat([x, x]), t_vec, cap, mask, rope, cross_attention_kwargs=kwargs, return_dict=False)[
            0
        ]
        out = out.chunk(2, dim=1)[0]
        cond, uncond = out[:b], out[b:]
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([guided[:, :3], cond[:, 3:]], dim=1)

    with torch.no_grad():
        for t0, t1 in zip(t[:-1].tolist(), t[1:].tolist()):
            dt = t1 - t0
            x_mid = x + 0.5 * dt * velocity(x, t0)
            x = x + dt * velocity(x_mid, t0 + 0.5 * dt)
    return x.numpy()


def test_original_sampler_semantics(reference, ours, mode):
    pipe, _ = reference
    tokens = pipe.tokenizer(PROMPTS + [""] * len(PROMPTS), padding=True, pad_to_multiple_of=8, max_length=256,
                            truncation=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        cap = pipe.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
    cap = cap.hidden_states[-2]
    noise = _noise(seed=1)
    scale = (HEIGHT * WIDTH) ** 0.5 / 64  # beyond the training area: time-aware scaling on
    expected = _original_sampler(pipe.transformer, noise, cap, tokens.attention_mask, 7, scale, 0.3, base_seqlen=16)
    out = ours(PROMPTS, "", latents=noise, settings=SampleSettings(height=HEIGHT, width=WIDTH, num_steps=7),
               progress=False)  # fmt: skip
    assert sampling.rope_scaling(HEIGHT, WIDTH, train_size=64)["scale_factor"] == pytest.approx(scale)
    assert rel_err(out.latents, expected) <= LATENT_BUDGET


def test_same_seed_same_image_and_batches(ours, pynative):
    settings = SampleSettings(height=32, width=48, num_steps=3, solver="euler")
    a = ours(PROMPTS, seed=7, settings=settings, progress=False)
    again = ours(PROMPTS, seed=7, settings=settings, progress=False)
    alone = ours(PROMPTS[:1], seed=7, settings=settings, progress=False)  # same noise row, shorter caption padding
    other = ours(PROMPTS, seed=8, settings=settings, progress=False)
    assert len(a.images) == 2 and a.images[0].size == (48, 32)
    assert np.array_equal(a.latents, again.latents)
    assert rel_err(alone.latents, a.latents[:1]) <= 1e-5
    assert rel_err(other.latents, a.latents) > 1e-2


def test_img2img_keeps_the_source_at_low_strength(ours, pynative):
    settings = SampleSettings(height=32, width=32, num_steps=11, solver="euler")
    source = np.random.default_rng(3).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    weak = ours(PROMPTS[:1], image=source, strength=0.1, settings=settings, progress=False)
    strong = ours(PROMPTS[:1], image=source, strength=1.0, settings=settings, progress=False)
    x1 = ours.encode_images(source)
    assert rel_err(weak.latents, x1) < rel_err(strong.latents, x1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"height": 40}, "height must be a positive multiple of 16"),
        ({"width": 0}, "width must be a positive multiple of 16"),
        ({"num_steps": 1}, "num_steps counts grid points"),
        ({"guidance_scale": -1.0}, "guidance scale must be >= 0"),
        ({"solver": "heun"}, "unknown solver 'heun'"),
        ({"schedule": "cosine"}, "unknown schedule 'cosine'"),
    ],
)
def test_bad_settings_fail_before_work(ours, overrides, message):
    with pytest.raises(ValueError, match=message):
        ours(PROMPTS, progress=False, **overrides)


def test_missing_component_is_named(reference, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    with open(folder / "model_index.json", "w") as f:
        json.dump({"transformer": ["diffusers", "LuminaNextDiT2DModel"]}, f)
    os.symlink(os.path.join(reference[1], "transformer"), folder / "transformer")
    with pytest.raises(ValueError, match="missing the text_encoder/ component"):
        TextToImagePipeline.from_pretrained(str(folder))


def test_offline_hub_id_says_what_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="huggingface-cli download Alpha-VLLM/Lumina-Next-SFT-diffusers"):
        TextToImagePipeline.from_pretrained("Alpha-VLLM/Lumina-Next-SFT-diffusers")


def test_graph_mode_compiles_the_denoiser_once_per_resolution(ours):
    """On CPU graph mode the denoiser is the shared-block runner: its one block graph serves every layer."""
    ms.set_context(mode=ms.GRAPH_MODE)
    denoiser = ours.denoiser()
    assert isinstance(denoiser, SharedBlockNextDiT)
    before = len(denoiser.block.compile_cache)
    settings = SampleSettings(height=48, width=32, num_steps=4)
    ours(PROMPTS[:1], settings=settings, progress=False)
    ours(PROMPTS[:1], seed=1, settings=settings, progress=False)
    assert len(denoiser.block.compile_cache) == before + 1
    assert len(ours.transformer.compile_cache) == 0  # the whole-model graph is never built


def test_shared_block_and_whole_model_graph_give_the_same_latents(ours):
    ms.set_context(mode=ms.GRAPH_MODE)
    whole = TextToImagePipeline(ours.transformer, ours.text_encoder, ours.tokenizer, ours.vae, ours.train_size,
                               shared_block=False)  # fmt: skip
    assert whole.denoiser() is ours.transformer
    settings = SampleSettings(height=HEIGHT, width=WIDTH, num_steps=4)
    a = ours(PROMPTS, latents=_noise(), settings=settings, progress=False).latents
    b = whole(PROMPTS, latents=_noise(), settings=settings, progress=False).latents
    np.testing.assert_array_equal(a, b)


def test_sample_cli_writes_pngs_with_metadata_and_latents(reference, tmp_path):
    from PIL import Image

    sample = load_tool("sample")
    noise_file, latents_file = tmp_path / "noise.npz", tmp_path / "final.npz"
    np.savez(noise_file, latents=_noise()[:1, :, :4, :4])
    args = ["--model", reference[1], "--prompt", PROMPTS[0], "--resolution", "32x32", "--steps", "3", "--seed", "5",
            "--mode", "pynative", "--out", str(tmp_path / "out"), "--latents", str(noise_file),
            "--save-latents", str(latents_file)]  # fmt: skip
    sample.main(args)
    image = Image.open(tmp_path / "out" / "000_a-small-red-circle-in-the-top-left_seed5.png")
    assert image.size == (32, 32) and image.text["prompt"] == PROMPTS[0] and image.text["seed"] == "5"
    assert json.loads(image.text["settings"])["num_steps"] == 3
    assert np.load(latents_file)["latents"].shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        sample.main(args[:4] + ["--resolution", "32by32"])
    with pytest.raises(ValueError, match="--resolution 32x24: width and height must be multiples of 16"):
        sample.main(args[:4] + ["--resolution", "32x24", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
    # settings that need no model fail before a model is looked for
    for bad, message in ((["--steps", "1"], "--steps: must be an integer >= 2"), (["--cfg", "-1"], "--cfg")):
        with pytest.raises(ValueError, match=message):
            sample.main(["--model", str(tmp_path / "no-such-model"), "--prompt", "x", *bad])


def test_offload_gives_the_same_images_and_keeps_only_the_transformer(reference, ours):
    """offload=True: the text encoder is loaded for encoding and the VAE for decoding, both released afterwards, the
    transformer loaded once and kept; the images are those of the resident pipeline."""
    from mindone_lumina.pipeline import Lazy

    lazy = TextToImagePipeline.from_pretrained(reference[1], offload=True)
    assert all(isinstance(getattr(lazy, part), Lazy) for part in ("transformer", "text_encoder", "vae"))
    settings = SampleSettings(height=32, width=32, num_steps=3, solver="euler")
    a = lazy(PROMPTS, latents=_noise()[:, :, :4, :4], settings=settings, progress=False)
    assert isinstance(lazy.text_encoder, Lazy) and isinstance(lazy.vae, Lazy)  # released again
    assert not isinstance(lazy.transformer, Lazy)  # kept for the next call
    b = ours(PROMPTS, latents=_noise()[:, :, :4, :4], settings=settings, progress=False)
    assert np.array_equal(a.latents, b.latents)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))


def test_model_folder_settings_are_the_defaults(reference, ours, tmp_path):
    """mindone_lumina.json: its sampling settings are a call's defaults and its prompt template wraps the prompts;
    unknown settings and templates without exactly one {} are refused by name."""
    import shutil

    from mindone_lumina.io import diffusers_io

    folder = tmp_path / "with-settings"
    shutil.copytree(reference[1], folder)
    settings = {
        "train_size": 64,
        "prompt_template": "{}, high quality",
        "sampling": {"solver": "euler", "num_steps": 5},
    }
    (folder / diffusers_io.PROJECT_FILE).write_text(json.dumps(settings))
    pipe = TextToImagePipeline.from_pretrained(str(folder))
    assert (pipe.defaults.solver, pipe.defaults.num_steps, pipe.defaults.shift) == ("euler", 5, 4.0)
    seen = []
    pipe.encode_prompts = lambda prompts, negative: seen.append(prompts) or ours_encode(prompts, negative)
    ours_encode = TextToImagePipeline.encode_prompts.__get__(pipe)
    pipe(PROMPTS[:1], settings=SampleSettings(height=32, width=32, num_steps=2), progress=False)
    assert seen == [[PROMPTS[0] + ", high quality"]]
    for bad, message in (({"sampling": {"sampler": "euler"}}, r"unknown sampling setting\(s\) \['sampler'\]"),
                         ({"prompt_template": "no slot"}, "exactly one {}")):  # fmt: skip
        (folder / diffusers_io.PROJECT_FILE).write_text(json.dumps({**settings, **bad}))
        with pytest.raises(ValueError, match=message):
            TextToImagePipeline.from_pretrained(str(folder))
