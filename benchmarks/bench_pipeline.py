"""End-to-end text-to-image seconds per image: this project in MindSpore graph mode vs diffusers 0.35.2
``LuminaPipeline`` (PyTorch eager), same random mid-size model, same prompt, noise, Euler grid and guidance.

    python benchmarks/bench_pipeline.py [--sizes 512 1024] [--steps 10]

Model: Gemma-architecture encoder (hidden 2048, 4 layers, MQA, BPE vocabulary), Next-DiT hidden 768 / 12 layers /
12 heads / 4 kv heads, the full SDXL-VAE. Batch 1 with CFG (the denoiser sees batch 2). Reports the graph compile
time separately (a 2-point warm-up run per size) and the share of text encoding, denoising and decoding.
"""

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline
from transformers import GemmaConfig, GemmaModel, GemmaTokenizerFast

import mindspore as ms

from mindone_lumina.gemma import train_tokenizer
from mindone_lumina.pipeline import LuminaNextPipeline, SampleSettings

PROMPT = "a photograph of a red fox sitting in a snowy forest at sunrise, detailed fur, soft light"


def build_reference(folder: str) -> LuminaPipeline:
    torch.manual_seed(0)
    train_tokenizer([PROMPT, "a cat", "a dog on a beach"] * 4, 400).save_pretrained(os.path.join(folder, "tok"))
    tokenizer = GemmaTokenizerFast.from_pretrained(os.path.join(folder, "tok"), padding_side="right")
    gemma = GemmaModel(GemmaConfig(
        vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=8192, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=1, head_dim=256, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )).eval()  # fmt: skip
    transformer = LuminaNextDiT2DModel(
        sample_size=128, patch_size=2, in_channels=4, hidden_size=768, num_layers=12, num_attention_heads=12,
        num_kv_heads=4, learn_sigma=True, qk_norm=True, cross_attention_dim=2048,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for block in transformer.layers:
            block.gate.normal_(0, 0.5)  # open the zero-initialised cross-attention gates
            block.attn2.to_q.weight.copy_(block.attn1.to_q.weight)  # one wq, stored twice as in real checkpoints
            block.attn2.norm_q.load_state_dict(block.attn1.norm_q.state_dict())
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=1024,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025,
    ).eval()  # fmt: skip
    pipe = LuminaPipeline(transformer, FlowMatchEulerDiscreteScheduler(), vae, gemma, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(os.path.join(folder, "pipe"))
    return pipe


def timed_stages(pipe):
    """Wrap the reference's text encoder, transformer and VAE decoder to add up their wall time."""
    totals = {"text": 0.0, "denoise": 0.0, "decode": 0.0}

    def wrap(module, attr, key):
        inner = getattr(module, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            totals[key] += time.perf_counter() - start
            return out

        setattr(module, attr, timed)

    wrap(pipe.text_encoder, "forward", "text")
    wrap(pipe.transformer, "forward", "denoise")
    wrap(pipe.vae, "decode", "decode")
    return totals


def shares(seconds: dict) -> str:
    total = sum(seconds.values())
    return " / ".join(f"{100 * seconds[k] / total:.0f}%" for k in ("text", "denoise", "decode"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--steps", type=int, default=10, help="Euler steps (diffusers num_inference_steps)")
    args = p.parse_args()
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as folder:
        ref = build_reference(folder)
        ours = LuminaNextPipeline.from_pretrained(os.path.join(folder, "pipe"))
    totals = timed_stages(ref)
    print(f"# torch {torch.__version__} ({torch.get_num_threads()} threads), mindspore {ms.__version__}, "
          f"{args.steps} Euler steps, CFG 4.0, batch 1")  # fmt: skip
    print(
        "| size | diffusers s/image | MS graph s/image | MS/diffusers | MS compile s | diffusers text/denoise/decode "
        "| MS text/denoise/decode |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        noise = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
        for key in totals:
            totals[key] = 0.0
        start = time.perf_counter()
        ref(PROMPT, height=size, width=size, num_inference_steps=args.steps, guidance_scale=4.0,
            latents=torch.from_numpy(noise), clean_caption=False)  # fmt: skip
        t_ref = time.perf_counter() - start
        grid = 1.0 - ref.scheduler.sigmas.double().numpy()
        settings = SampleSettings(height=size, width=size, solver="euler", scaling="always", scale_watershed=1.0)

        start = time.perf_counter()  # warm-up: compiles the text encoder, denoiser and decoder graphs at this size
        ours(PROMPT, latents=noise, grid=grid[[0, 1, -1]], settings=settings, progress=False)
        t_warm = time.perf_counter() - start
        start = time.perf_counter()
        out = ours(PROMPT, latents=noise, grid=grid, settings=settings, progress=False)
        t_ours = time.perf_counter() - start
        steady_warm = out.seconds["text"] + out.seconds["decode"] + 2 * out.seconds["denoise"] / args.steps
        print(
            f"| {size}² | {t_ref:.1f} | {t_ours:.1f} | {t_ours / t_ref:.2f} | {t_warm - steady_warm:.1f} "
            f"| {shares(totals)} | {shares(out.seconds)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
