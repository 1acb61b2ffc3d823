"""Generate images from text with Lumina-Next in MindSpore.

    python tools/sample.py --prompt "a red circle on a blue background"            # the bundled default model
    python tools/sample.py --model DIR --prompt "..." --resolution 1024x1024 --steps 30 --solver midpoint --cfg 4

``--model`` is a pipeline folder (the diffusers layout, or the project's 0.1 layout), an original Lumina-T2X
checkpoint (with ``--text-encoder`` and ``--vae``), or a hub id. Sampling flags left out take the model's defaults
(its ``mindone_lumina.json``; else the original demo's: midpoint, 30 steps, shift 4, guidance 4). PNGs carry the
prompt, seed and settings in their text metadata. A Lumina-T2I (Flag-DiT) checkpoint takes a LLaMA-2 folder as its
text encoder:

    python tools/sample.py --model LUMINA_T2I_DIR --text-encoder LLAMA2_7B_DIR --vae SDXL_VAE_DIR --dtype fp16 \
        --solver euler --prompt "..."
"""

import argparse
import dataclasses
import json
import logging
import os

import numpy as np

import mindspore as ms

from mindone_lumina import sampling
from mindone_lumina.atomic import atomic_path
from mindone_lumina.pipeline import DEFAULT_MODEL, SampleSettings, TextToImagePipeline

# flag -> SampleSettings field, for the sampling flags that default to the model's own settings
SAMPLING_FLAGS = {"steps": "num_steps", "solver": "solver", "schedule": "schedule", "shift": "shift",
                  "cfg": "guidance_scale", "scaling": "scaling", "watershed": "scale_watershed"}  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Lumina-Next text-to-image (MindSpore)")
    p.add_argument("--prompt", nargs="+", default=None, help="one or more prompts")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default="", help="unconditional prompt (default: empty, as the original)")
    p.add_argument("--resolution", default=None, help="WIDTHxHEIGHT in pixels, multiples of 16 (default: the model's)")
    p.add_argument("--steps", type=int, help="time-grid points as the original (30 = 29 solver steps; default 30)")
    p.add_argument("--solver", choices=sampling.SOLVERS, help="ODE solver (default: midpoint)")
    p.add_argument("--schedule", choices=sampling.SCHEDULES, help="time grid (default: shift)")
    p.add_argument("--shift", type=float, help="time shift s of the 'shift' schedule (default: 4)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: 4)")
    p.add_argument("--cfg-all-channels", action="store_true", help="guide every latent channel, not only 0-2")
    p.add_argument("--scaling", choices=["original", "always", "off"], help="RoPE extrapolation (default: original)")
    p.add_argument("--smooth-rope", action="store_true", help="the paper's smooth time-aware RoPE formula")
    p.add_argument("--watershed", type=float, help="time-aware RoPE switch: PI below, NTK above (default: 0.3)")
    p.add_argument("--no-proportional-attn", action="store_true", help="turn proportional attention off")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or hub id (default: the bundled model)")
    p.add_argument("--text-encoder", "--gemma", dest="text_encoder", default=None,
                   help="text encoder folder for an original-format --model: Gemma (Lumina-Next) or LLaMA-2 "
                   "(Lumina-T2I); --gemma is the old name")  # fmt: skip
    p.add_argument("--vae", default=None, help="SDXL-VAE folder (for an original-format --model)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="default: fp32")
    p.add_argument("--offload", choices=["auto", "on", "off"], default="auto",
                   help="load the text encoder and VAE only while they are used (default: auto, on for big models "
                   "on CPU)")  # fmt: skip
    p.add_argument("--device", default="CPU", choices=["CPU", "Ascend"], help="default: CPU")
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"], help="default: graph")
    p.add_argument("--out", default="outputs", help="folder for the PNGs (default: outputs)")
    p.add_argument("--latents", default=None, help="npz with initial noise under 'latents' (as diffusers latents=)")
    p.add_argument("--save-latents", default=None, help="write the final latents (before decoding) to this npz")
    p.add_argument("--verbose", action="store_true", help="log each stage (loading, encoding, denoising) to stderr")
    return p.parse_args(argv)


def read_prompts(args) -> list:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise ValueError(f"cannot read prompts file {args.prompts_file}: {e}") from e
    if not prompts:
        raise ValueError("no prompt given: use --prompt TEXT or --prompts-file FILE")
    return prompts


def parse_resolution(text):
    if text is None:
        return {}
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise ValueError(f"--resolution must be WIDTHxHEIGHT, e.g. 1024x1024, got {text!r}") from e
    return {"height": height, "width": width}


def save_png(image, path: str, info: dict):
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for key, value in info.items():
        meta.add_text(key, value if isinstance(value, str) else json.dumps(value))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=meta)


def main(argv=None):
    args = parse_args(argv)
    if args.verbose:
        logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    prompts = read_prompts(args)
    overrides = {
        field: getattr(args, flag) for flag, field in SAMPLING_FLAGS.items() if getattr(args, flag) is not None
    }
    overrides |= parse_resolution(args.resolution) | {"guide_all_channels": args.cfg_all_channels,
                 "smooth_rope": args.smooth_rope, "proportional_attn": not args.no_proportional_attn}  # fmt: skip
    SampleSettings(**overrides).validate(1)  # steps, solver, schedule, guidance: before loading anything
    ms.set_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    offload = {"auto": None, "on": True, "off": False}[args.offload]
    pipe = TextToImagePipeline.from_pretrained(args.model, args.dtype, args.text_encoder, args.vae, offload)
    settings = dataclasses.replace(pipe.defaults, **overrides)
    settings.validate(pipe.size_multiple)  # sizes: before any sampling
    latents = None
    if args.latents:
        with np.load(args.latents) as data:
            if "latents" not in data:
                raise ValueError(f"{args.latents} has no 'latents' array (keys: {list(data.keys())})")
            latents = data["latents"]

    result = pipe(prompts, args.negative_prompt, seed=args.seed, latents=latents, settings=settings)
    os.makedirs(args.out, exist_ok=True)
    for i, (prompt, image) in enumerate(zip(prompts, result.images)):
        path = os.path.join(args.out, f"{i:03d}_seed{args.seed}.png")
        info = {"prompt": prompt, "negative_prompt": args.negative_prompt, "seed": args.seed, "model": args.model}
        save_png(image, path, {**info, "settings": vars(settings) | {"height": image.height, "width": image.width}})
        print(f"wrote {path}")
    if args.save_latents:
        with atomic_path(args.save_latents) as tmp, open(tmp, "wb") as f:
            np.savez(f, latents=result.latents)
        print(f"wrote {args.save_latents}")


if __name__ == "__main__":
    main()
