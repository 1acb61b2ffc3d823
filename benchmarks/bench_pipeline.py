"""End-to-end text-to-image seconds per image: this project in MindSpore graph mode vs diffusers 0.35.2
``LuminaPipeline`` (PyTorch eager), same random mid-size model, same prompt, noise, Euler grid and guidance.

    python benchmarks/bench_pipeline.py [--sizes 512 1024] [--steps 10] [--denoisers shared whole]

Model: Gemma-architecture encoder (hidden 2048, 4 layers, MQA, BPE vocabulary), Next-DiT hidden 768 / 12 layers /
12 heads / 4 kv heads, the full SDXL-VAE. Batch 1 with CFG (the denoiser sees batch 2). The parent process builds and
saves the random pipeline once; every (framework, size) then runs in its own process, one after the other, so a
framework's models and graphs never share the 24 GiB with the other's and peak RSS is that run's own. MindSpore
reports the graph compile time separately (a 2-point warm-up run per size) and both report the share of text
encoding, denoising and decoding. The final latents of the two runs are compared as a sanity check.
MindSpore's denoiser is the pipeline's CPU default, one block graph shared by the layers (``shared``), and with
``--denoisers shared whole`` also the whole-model graph (``whole``, ``shared_block=False``).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from workers import worker_env

PROMPT = "a photograph of a red fox sitting in a snowy forest at sunrise, detailed fur, soft light"


def build_reference(folder: str) -> None:
    """Save a random diffusers-layout pipeline to ``folder/pipe`` (both workers load it)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline
    from transformers import GemmaConfig, GemmaModel, GemmaTokenizerFast

    from mindone_lumina.text.tokenizers import train_tokenizer

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
    LuminaPipeline(transformer, FlowMatchEulerDiscreteScheduler(), vae, gemma, tokenizer).save_pretrained(
        os.path.join(folder, "pipe")
    )


def noise_for(size: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)


def euler_grid(steps: int) -> np.ndarray:
    """diffusers' Euler time grid in Lumina time (t = 0 noise), as its scheduler builds it for ``steps``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(steps)
    return 1.0 - scheduler.sigmas.double().numpy()


def timed_stages(pipe) -> dict:
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


def torch_worker(folder: str, size: int, steps: int) -> dict:
    import torch
    from diffusers import LuminaPipeline
    from transformers import GemmaTokenizerFast

    torch.set_grad_enabled(False)
    pipe = LuminaPipeline.from_pretrained(os.path.join(folder, "pipe"))
    pipe.tokenizer = GemmaTokenizerFast.from_pretrained(os.path.join(folder, "pipe", "tokenizer"), padding_side="right")
    pipe.set_progress_bar_config(disable=True)
    totals = timed_stages(pipe)
    start = time.perf_counter()
    latents = pipe(
        PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=4.0,
        latents=torch.from_numpy(noise_for(size)), clean_caption=False, output_type="latent",
    ).images  # fmt: skip
    # decode as the pipeline does, timed with the rest (output_type="latent" skips it inside the call)
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    seconds = time.perf_counter() - start
    assert image.shape[-1] == size
    return {"seconds": seconds, "stages": totals, "latents": latents.float().numpy().ravel()[:4096].tolist()}


def mindspore_worker(folder: str, size: int, steps: int, denoiser: str = "shared") -> dict:
    import mindspore as ms

    from mindone_lumina import backend
    from mindone_lumina.pipeline import TextToImagePipeline
    from mindone_lumina.sampling import SampleSettings

    backend.set_device("CPU")  # what tools/sample.py does
    ms.set_context(mode=ms.GRAPH_MODE)
    ours = TextToImagePipeline.from_pretrained(os.path.join(folder, "pipe"))
    ours.shared_block = denoiser == "shared"
    grid, noise = euler_grid(steps), noise_for(size)
    settings = SampleSettings(height=size, width=size, solver="euler", scaling="always", scale_watershed=1.0)
    start = time.perf_counter()  # warm-up: compiles the text encoder, denoiser and decoder graphs at this size
    ours(PROMPT, latents=noise, grid=grid[[0, 1, -1]], settings=settings, progress=False)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    out = ours(PROMPT, latents=noise, grid=grid, settings=settings, progress=False)
    seconds = time.perf_counter() - start
    steady_warm = out.seconds["text"] + out.seconds["decode"] + 2 * out.seconds["denoise"] / steps
    # both return the denoiser-space (scaled) latents before decoding
    return {
        "seconds": seconds,
        "compile": warm - steady_warm,
        "stages": out.seconds,
        "latents": out.latents.ravel()[:4096].tolist(),
    }


def run_worker(kind: str, folder: str, size: int, steps: int, denoiser: str = "shared", isa: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--folder", folder, "--sizes", str(size), "--steps", str(steps)]
    cmd += ["--denoisers", denoiser]
    env = worker_env(ONEDNN_MAX_CPU_ISA=isa) if isa else worker_env()  # the cap: this worker's oneDNN only
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shares(seconds: dict) -> str:
    total = sum(seconds.values())
    return " / ".join(f"{100 * seconds[k] / total:.0f}%" for k in ("text", "denoise", "decode"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--steps", type=int, default=10, help="Euler steps (diffusers num_inference_steps)")
    p.add_argument("--denoisers", nargs="+", default=["shared"], choices=["shared", "whole"])
    p.add_argument(
        "--mindspore-isa", default=None,
        help="also run MindSpore with oneDNN capped at this ISA, e.g. AVX2 (ONEDNN_MAX_CPU_ISA in its worker only; "
        "its VAE then decodes on MindSpore's own conv kernel) (default: off)",
    )  # fmt: skip
    p.add_argument("--worker", choices=["torch", "mindspore"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        if args.worker == "torch":
            result = torch_worker(args.folder, args.sizes[0], args.steps)
        else:
            result = mindspore_worker(args.folder, args.sizes[0], args.steps, args.denoisers[0])
        result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(result))
        return
    import torch

    import mindspore as ms

    print(f"# torch {torch.__version__} ({torch.get_num_threads()} threads), mindspore {ms.__version__}, "
          f"{args.steps} Euler steps, CFG 4.0, batch 1, one process per row and framework")  # fmt: skip
    print(
        "| size | MS denoiser | diffusers s/image | MS graph s/image | MS/diffusers | MS compile s "
        "| diffusers text/denoise/decode | MS text/denoise/decode | peak RSS GiB diffusers / MS | latents rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        build_reference(folder)
        for size in args.sizes:
            ref = run_worker("torch", folder, size, args.steps)
            for denoiser in args.denoisers:
                report(size, denoiser, ref, run_worker("mindspore", folder, size, args.steps, denoiser))
                if args.mindspore_isa:
                    ours = run_worker("mindspore", folder, size, args.steps, denoiser, args.mindspore_isa)
                    report(size, f"{denoiser}, oneDNN at {args.mindspore_isa}", ref, ours)


def report(size: int, denoiser: str, ref: dict, ours: dict) -> None:
    failed = [f"{k}: {r['error']}" for k, r in (("diffusers", ref), ("mindspore", ours)) if "error" in r]
    if failed:
        print(f"| {size}² | {denoiser} | " + "; ".join(failed) + " |", flush=True)
        return
    a, b = np.array(ours["latents"]), np.array(ref["latents"])
    rel = float(np.abs(a - b).max() / np.abs(b).max())
    print(
        f"| {size}² | {denoiser} | {ref['seconds']:.1f} | {ours['seconds']:.1f} "
        f"| {ours['seconds'] / ref['seconds']:.2f} | {ours['compile']:.1f} "
        f"| {shares(ref['stages'])} | {shares(ours['stages'])} "
        f"| {ref['peak_gib']:.1f} / {ours['peak_gib']:.1f} | {rel:.1e} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
