"""Shared test helpers. Parity tests compare against the PyTorch reference (torch 2.13.0, diffusers 0.35.2,
transformers 4.57.1) with the relative Frobenius error ||ms - ref|| / ||ref||."""

import os

import numpy as np
import pytest

import mindspore as ms

ms.set_device("CPU")
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


def rel_err(actual, reference) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    return float(np.linalg.norm(actual - reference) / np.linalg.norm(reference))


@pytest.fixture(params=list(MODES))
def mode(request):
    """Run the test in MindSpore graph mode and in PyNative."""
    previous = ms.get_context("mode")
    ms.set_context(mode=MODES[request.param])
    yield request.param
    ms.set_context(mode=previous)


@pytest.fixture
def pynative():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=previous)


def randomize_torch_(module, seed: int = 0, std: float = 0.1):
    """Give every parameter of a torch module a random value (norm scales around 1, the rest around 0), so that
    zero-initialised gates, adaLN and output layers take part in the comparison."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            is_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_((1.0 + 0.1 * noise) if is_scale else std * noise)
    return module


SENTENCES = [
    "a small red circle in the top left on a blue background",
    "a large green square in the center on a white background",
    "ein kleiner roter Kreis auf blauem Hintergrund",
    "一个红色的圆圈在蓝色的背景上",
    "a happy dog 🐶 under the sun ☀️",
]


def make_tokenizer_dir(folder: str, vocab_size: int = 300, sentences=SENTENCES) -> str:
    """``gemma.train_tokenizer`` on ``sentences``, saved to ``folder`` (padding side is not saved: set it on load)."""
    from mindone_lumina.gemma import train_tokenizer

    train_tokenizer(sentences, vocab_size).save_pretrained(folder)
    return folder


def load_tool(name: str):
    """The module of ``tools/<name>.py`` (tools/ is a folder of scripts, not a package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(FIXTURES), os.pardir, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tools_{name}", os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_diffusers_pipeline(folder: str):
    """Tiny random diffusers ``LuminaPipeline`` (Gemma, Next-DiT, 8x VAE) saved in the diffusers layout under
    ``folder/pipe``; returns (pipeline, that folder)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline
    from transformers import GemmaConfig, GemmaModel, GemmaTokenizerFast

    torch.manual_seed(0)
    tokenizer = GemmaTokenizerFast.from_pretrained(make_tokenizer_dir(os.path.join(folder, "tok")))
    tokenizer.padding_side = "right"
    gemma_cfg = GemmaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, pad_token_id=0, bos_token_id=2,
        eos_token_id=1,
    )  # fmt: skip
    text_encoder = randomize_torch_(GemmaModel(gemma_cfg).eval(), seed=1, std=0.3)
    transformer = LuminaNextDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=2,
        num_kv_heads=1, multiple_of=16, learn_sigma=True, qk_norm=True, cross_attention_dim=32,
    ).eval()  # fmt: skip
    randomize_torch_(transformer, seed=2)
    with torch.no_grad():
        for block in transformer.layers:  # real checkpoints hold equal copies of wq / q_norm in attn1 and attn2
            block.attn2.to_q.weight.copy_(block.attn1.to_q.weight)
            block.attn2.norm_q.load_state_dict(block.attn1.norm_q.state_dict())
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=64, scaling_factor=0.13025,
    ).eval()  # fmt: skip
    pipe = LuminaPipeline(transformer, FlowMatchEulerDiscreteScheduler(), vae, text_encoder, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(os.path.join(folder, "pipe"))
    return pipe, os.path.join(folder, "pipe")
