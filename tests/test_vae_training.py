"""VAE training (``vae_training.py``, ``tools/train_vae.py``): the loss and its gradients equal diffusers'
``AutoencoderKL`` in PyTorch for the same weights, images and noise; a tiny VAE trains past the 18th step (where a
graph with ``ops.pad`` used to hang), resumes bit for bit, and exports a folder that diffusers and the project load
with the fitted scaling factor; bad recipes are named. CPU, tiny configs."""

import json
import os

import numpy as np
import pytest
import torch
import yaml
from conftest import load_tool, randomize_torch_, rel_err
from diffusers import AutoencoderKL as TorchAutoencoderKL
from PIL import Image
from safetensors.numpy import load_file

import mindspore as ms
from mindspore import Tensor

from mindone_lumina import convolution, training
from mindone_lumina.components import load_vae
from mindone_lumina.training import vae as vae_training

TINY = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4}
KL_WEIGHT = 0.05  # large enough that the KL term moves the encoder's gradients visibly
# fp32, per-tap matmul convolutions against torch's conv kernels, relative: measured loss 1.0e-7, gradients <= 1.7e-5
# (the largest on biases whose exact gradient is zero or tiny, compared against the floor below), both modes
LOSS_BUDGET, GRAD_BUDGET = 1e-6, 5e-5


def torch_loss(model, x, eps, kl_weight):
    """The objective of ``vae_training.VAELoss`` written with diffusers' own posterior and KL."""
    posterior = model.encode(x).latent_dist
    rec = model.decode(posterior.mean + posterior.std * eps).sample
    return ((rec - x) ** 2).mean() + kl_weight * posterior.kl().sum() / x.numel()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in TINY.items()}
    model = TorchAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                               **kwargs)  # fmt: skip
    randomize_torch_(model)
    folder = str(tmp_path_factory.mktemp("vae") / "vae")
    model.save_pretrained(folder)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)  # non-square
    eps = rng.standard_normal((2, 4, 8, 12)).astype(np.float32)
    loss = torch_loss(model, torch.from_numpy(x), torch.from_numpy(eps), KL_WEIGHT)
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    return {"folder": folder, "x": x, "eps": eps, "loss": loss.item(), "grads": grads}


def test_loss_and_gradients_match_diffusers(reference, mode):
    model = load_vae(reference["folder"])
    loss_cell = vae_training.VAELoss(model, KL_WEIGHT)
    named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]
    grad_fn = ms.value_and_grad(loss_cell, None, [p for _, p in named])
    if mode == "graph":
        grad_fn = ms.jit(grad_fn)
    loss, grads = grad_fn(Tensor(reference["x"]), Tensor(reference["eps"]))
    assert abs(float(loss) - reference["loss"]) <= LOSS_BUDGET * abs(reference["loss"])
    assert sorted(n for n, _ in named) == sorted(reference["grads"])
    # errors relative to each tensor's norm, floored at 1e-3 of the largest: a conv bias in front of a GroupNorm has
    # a gradient of exactly zero in exact arithmetic (the norm removes it), ~1e-9 of rounding noise in both frameworks
    floor = 1e-3 * max(np.linalg.norm(r) for r in reference["grads"].values())
    for (name, _), g in zip(named, grads):
        ref = reference["grads"][name]
        err = np.linalg.norm(g.asnumpy() - ref) / max(np.linalg.norm(ref), floor)
        assert err <= GRAD_BUDGET, (name, err)


def test_pad2d_is_zero_padding():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    out = convolution.pad2d(Tensor(x), 1, 2, 0, 3).asnumpy()
    assert np.array_equal(out, np.pad(x, ((0, 0), (0, 0), (0, 3), (1, 2))))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    data = tmp_path_factory.mktemp("vae_data")
    rows = []
    for i, rgb in enumerate([(220, 40, 40), (40, 70, 220), (30, 200, 60), (240, 240, 240)]):
        img = np.full((16, 16, 3), 255 - np.array(rgb), np.uint8)
        img[4 + i : 12, 2 : 10 + i] = rgb
        Image.fromarray(img).save(data / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": "-"})
    (data / "broken.png").write_bytes(b"not a png")
    rows.append({"image": "broken.png", "caption": "-"})
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(data)


def vae_recipe(tmp_path, data, **kw):
    raw = {"data": data, "output": str(tmp_path / "run"), "resolution": 16, "vae": TINY, "batch_size": 2,
           "steps": 24, "lr": 3e-3, "ema_decay": 0.9, "save_every": 12, "log_every": 12, **kw}  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "vae.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_vae_trains_resumes_and_exports(tmp_path, images, capsys):
    """Mid-run resume is bit-exact for every model in the shared loop (tests/test_training.py); what is the VAE's own
    here: it learns, its checkpoint loads back whole, and its batches (images and posterior noise) are a function of
    the step alone, which is what makes a resumed run equal a straight one."""
    # straight through the CLI, 24 steps (a graph holding ops.pad hung on its 18th run; convolution.pad2d)
    straight = vae_recipe(tmp_path / "a", images, log_every=1)
    load_tool("train_vae").main(["--config", straight, "--export", str(tmp_path / "exported")])
    printed = capsys.readouterr().out.splitlines()
    losses = [float(line.split(" loss ")[1].split()[0]) for line in printed if line.startswith("step ")]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4]), losses  # measured: 0.62 -> 0.45
    log = []
    cfg = vae_training.VAETrainConfig.from_yaml(straight)
    resumed = vae_training.train_vae(cfg, log=log.append)  # finished: loads the last checkpoint, takes no step
    assert resumed.history == [] and any(line.startswith("resumed from") and "at step 24" in line for line in log), log
    done = training.latest_checkpoint(str(tmp_path / "a" / "run"))
    for part in ("model", "ema"):
        saved = load_file(os.path.join(done, f"{part}.safetensors"))
        source = resumed.params if part == "model" else resumed.ema
        assert sorted(saved) == sorted(resumed.param_names)
        for name, p in zip(resumed.param_names, source):
            assert np.array_equal(saved[name], p.asnumpy()), (part, name)  # bit-exact
    first, again = (vae_training.make_batch(resumed.data, cfg, 13) for _ in range(2))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # a resumed run draws the same batch 13
    assert not np.array_equal(first[1], vae_training.make_batch(resumed.data, cfg, 12)[1])  # fresh noise per step

    # the export: diffusers loads it, its scaling factor is 1 / std of the posterior means of the training images
    folder = str(tmp_path / "exported")
    reference = TorchAutoencoderKL.from_pretrained(folder).eval()
    pixels = np.stack([training.load_image(os.path.join(images, f"{i}.png"), [(16, 16)]) for i in range(4)])
    with torch.no_grad():
        means = reference.encode(torch.from_numpy(pixels)).latent_dist.mean.numpy()
    assert abs(reference.config.scaling_factor * means.std() - 1.0) < 1e-4
    ours = load_vae(folder)
    assert ours.cfg.scaling_factor == reference.config.scaling_factor
    assert rel_err(ours.encode(Tensor(pixels)).mean.asnumpy(), means) <= 1e-5
    with pytest.raises(ValueError, match="exists and is not empty"):
        vae_training.export_vae(cfg, resumed, folder)


def test_bad_vae_recipes_are_named(tmp_path, images):
    cases = [
        ({"vae": {**TINY, "down_blocks": 2}}, r"unknown vae setting\(s\) \['down_blocks'\]"),
        ({"vae": {**TINY, "norm_num_groups": 5}}, "not divisible by norm_num_groups 5"),
        ({"resolution": 15, "bucket_multiple": 5}, "bucket 15x15 is not divisible by the VAE's downsampling factor 2"),
        ({"kl_weight": -1.0}, "kl_weight must be >= 0"),
        ({"mode": "eager"}, "mode must be graph or pynative"),
        ({"steps": 0}, "steps must be >= 1"),
    ]
    for i, (change, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            vae_training.VAETrainConfig.from_yaml(vae_recipe(tmp_path / str(i), images, **change))
    path = tmp_path / "no_vae.yaml"
    path.write_text(yaml.safe_dump({"data": images, "output": str(tmp_path / "x")}))
    with pytest.raises(ValueError, match=r"needs key\(s\) \['vae'\]"):
        vae_training.VAETrainConfig.from_yaml(str(path))
