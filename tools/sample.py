"""Generate images from text with Lumina-Next in MindSpore.

    python tools/sample.py --prompt "a red circle on a blue background"            # the bundled default model
    python tools/sample.py --model DIR --prompt "..." --resolution 1024x1024 --steps 30 --solver midpoint --cfg 4
    python tools/sample.py --lora runs/hexagon-lora/adapter --lora-scale 1.0 --prompt "a red hexagon on blue"

``--model`` is a pipeline folder (the diffusers layout, or the project's 0.1 layout), an original Lumina-T2X
checkpoint (with ``--text-encoder`` and ``--vae``), or a hub id. Sampling flags left out take the model's defaults
(its ``mindone_lumina.json``; else the original demo's: midpoint, 30 steps, shift 4, guidance 4).

Images go to ``--out``: a folder (``outputs``) gets ``INDEX_PROMPT-WORDS_seedSEED.png``, with ``_2``, ``_3``, ... when a
name is taken, so earlier runs are never overwritten (``--overwrite`` replaces them instead); a ``.png`` name writes
that one file for a single prompt. PNGs carry the prompt, seed and every setting in their text metadata. Every
argument is checked before the model is loaded; an interrupted run (Ctrl-C, SIGTERM) keeps the images it finished
and leaves no partial file. Under msrun (one process per device, ``scripts/ascend/``) rank r generates prompts r,
r + world, ... with seed + r, each under its own index.

A Lumina-T2I (Flag-DiT) checkpoint takes a LLaMA-2 folder as its text encoder:

    python tools/sample.py --model LUMINA_T2I_DIR --text-encoder LLAMA2_7B_DIR --vae SDXL_VAE_DIR --dtype fp16 \
        --solver euler --prompt "..."
"""

import argparse
import dataclasses
import logging
import os
import zipfile

import numpy as np

import mindspore as ms

from mindone_lumina import backend, cli, sampling
from mindone_lumina.atomic import atomic_path
from mindone_lumina.pipeline import DEFAULT_MODEL, SampleSettings, TextToImagePipeline, size_factors
from mindone_lumina.training.loop import data_parallel_world
from mindone_lumina.weights import lora as lora_files

# flag -> SampleSettings field, for the sampling flags that default to the model's own settings
SAMPLING_FLAGS = {"steps": "num_steps", "solver": "solver", "schedule": "schedule", "shift": "shift",
                  "cfg": "guidance_scale", "scaling": "scaling", "watershed": "scale_watershed",
                  "context_drop": "context_drop", "context_drop_until": "context_drop_until",
                  "context_drop_layers": "context_drop_layers"}  # fmt: skip
NOT_PNG = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")  # --out names that promise another format


def _bundled_multiple() -> str:
    """The bundled model's size multiple for --help, read as the resolution check reads it (so both say the same)."""
    try:
        patch, factor = size_factors(DEFAULT_MODEL)
    except ValueError:  # the bundled model is being replaced: --help still works
        return ""
    return f"{patch * factor} for the bundled model ({patch} x {factor}), "


def parser():
    p = cli.Parser(description=__doc__)
    add, model_default = p.add_argument, "(default: the model's, else %s)"
    add("--prompt", nargs="+", help="one or more prompts (default: none; --prompt, --prompts-file or both)")
    add("--prompts-file", help="a text file with one prompt per line (default: none)")
    add("--negative-prompt", default="", help="unconditional prompt (default: empty, as the original)")
    multiples = f"{_bundled_multiple()}16 for Lumina-Next"
    add("--resolution", type=cli.resolution, help="WIDTHxHEIGHT in pixels, each side a multiple of the model's "
        f"patch size x VAE factor ({multiples}) (default: the model's training size)")  # fmt: skip
    add("--steps", type=cli.integer(2), help="time-grid points as the original, >= 2 (30 = 29 solver steps) "
        + model_default % 30)  # fmt: skip
    add("--solver", choices=sampling.SOLVERS, help="ODE solver " + model_default % "midpoint")
    add("--schedule", choices=sampling.SCHEDULES, help="time grid " + model_default % "shift")
    add("--shift", type=cli.number(above=0), help="time shift s > 0 of the 'shift' schedule " + model_default % 4)
    add("--cfg", type=cli.number(0), help="classifier-free guidance scale, >= 0 " + model_default % 4)
    add("--cfg-all-channels", action="store_true", help="guide every latent channel (default: off: channels 0-2 only, "
        "as the original)")  # fmt: skip
    add("--scaling", choices=["original", "always", "off"], help="RoPE extrapolation (default: original)")
    add("--smooth-rope", action="store_true", help="the paper's smooth time-aware RoPE formula (default: off: the "
        "released hard switch)")  # fmt: skip
    add("--watershed", type=cli.number(0, 1), help="time-aware RoPE switch in [0, 1]: PI below, NTK above "
        + model_default % 0.3)  # fmt: skip
    add("--no-proportional-attn", action="store_true", help="turn proportional attention off (default: off)")
    add("--context-drop", type=cli.integer(1), metavar="N", help="Context Drop: self-attention merges the keys and "
        "values of N x N neighbouring image tokens (2 = 2x2 average pooling; 1 = off) in the evaluations at t < "
        "--context-drop-until " + model_default % 1)  # fmt: skip
    add("--context-drop-until", type=cli.number(0, 1), metavar="T", help="Context Drop's window: merge while t < T, "
        "t = 0 noise, 1 data " + model_default % 0.3)  # fmt: skip
    add("--context-drop-layers", type=layer_spec, metavar="LAYERS", help="the layers that merge: 'all' or 0-based "
        "indices and ranges such as '0-5,8' " + model_default % "all")  # fmt: skip
    add("--seed", type=cli.seed, default=0, help=f"seed of the initial noise, 0..{cli.SEED_MAX} (default: 0)")
    add("--model", default=DEFAULT_MODEL, help="model folder or hub id (default: the bundled model)")
    add("--text-encoder", "--gemma", dest="text_encoder", help="text encoder folder for an original-format "
        "--model: Gemma (Lumina-Next) or LLaMA-2 (Lumina-T2I); --gemma is the old name (default: the --model "
        "folder's)")  # fmt: skip
    add("--vae", help="SDXL-VAE folder for an original-format --model (default: the --model folder's)")
    add(
        "--lora",
        action="append",
        metavar="PATH",
        help="a LoRA adapter folder (peft's adapter_model.safetensors + "
        "adapter_config.json, e.g. an export of tools/train.py with lora:); repeat for several (default: none)",
    )
    add("--lora-scale", action="append", type=float, metavar="S", help="scale of each --lora, in order; one value "
        "applies to all (default: 1)")  # fmt: skip
    add("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights and compute dtype")
    add("--offload", choices=["auto", "on", "off"], default="auto", help="load the text encoder and VAE only while "
        "they are used (default: auto, on for big models on CPU)")  # fmt: skip
    add("--device", default="CPU", choices=["CPU", "Ascend"], help="device to run on")
    add("--mode", default="graph", choices=["graph", "pynative"], help="MindSpore execution mode")
    add("--out", default="outputs", help="a folder for the PNGs (names: see above), or a .png file for one prompt")
    add("--overwrite", action="store_true", help="replace files of the same name (default: off: a taken name gets a "
        "counter, a taken --out FILE.png or --save-latents file is an error)")  # fmt: skip
    add("--latents", help="npz with the initial noise under 'latents', as diffusers' latents= (default: none: drawn "
        "from --seed)")  # fmt: skip
    add("--save-latents", help="write the final latents (before decoding) to this npz (default: none)")
    add("--verbose", action="store_true", help="log each stage to stderr (default: off: warnings only)")
    return p


def layer_spec(text: str) -> str:
    """An argparse type: a ``SampleSettings.context_drop_layers`` text; the model's depth is checked once loaded."""
    try:
        SampleSettings(context_drop_layers=text).validate(1)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("context_drop_layers: ")) from None
    return text


def read_prompts(args) -> list:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompts-file {args.prompts_file}: cannot read it ({e})") from e
    if not prompts:
        raise ValueError("no prompt given: use --prompt TEXT or --prompts-file FILE")
    return prompts


def check_model(args) -> dict:
    """--model (with --text-encoder, --vae) readable as a model, and --resolution as SampleSettings fields, a multiple
    of the model's patch size x VAE factor: from its config files, nothing is loaded."""
    factors = size_factors(args.model, args.text_encoder, args.vae)
    if args.resolution is None:
        return {}
    width, height = args.resolution
    if factors is not None:  # else a hub id: the pipeline checks once it is downloaded
        patch, factor = factors
        m = patch * factor
        if width % m or height % m:
            nearest = "x".join(str(max(m, round(v / m) * m)) for v in (width, height))
            raise ValueError(
                f"--resolution {width}x{height}: width and height must be multiples of {m} (patch size "
                f"{patch} x VAE factor {factor} of --model {args.model}); the nearest is {nearest}"
            )
    return {"height": height, "width": width}


def check_outputs(args, count: int) -> str | None:
    """The one file ``--out`` names (a .png), or None for a folder; every output checked before anything loads."""
    if args.save_latents:
        cli.output_file(args.save_latents, "--save-latents", args.overwrite)
    ext = os.path.splitext(args.out)[1].lower()
    if ext in NOT_PNG:
        raise ValueError(f"--out {args.out}: images are written as PNG; name a .png file or a folder")
    if ext != ".png":
        cli.output_folder(args.out, "--out")
        return None
    if count != 1:
        raise ValueError(f"--out {args.out} names one image, but {count} prompts were given; name a folder instead")
    return cli.output_file(args.out, "--out", args.overwrite)


def read_latents(path: str | None):
    """The initial noise of ``--latents`` (read before the model is loaded), or None."""
    if path is None:
        return None
    cli.existing(path, "--latents", "file")
    try:
        data, arrays = np.load(path), {}
        if isinstance(data, np.lib.npyio.NpzFile):  # not a bare .npy array
            with data:
                arrays = {k: data[k] for k in data.keys()}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # ValueError: a file numpy would unpickle
        raise ValueError(f"--latents {path}: not a readable npz file ({e})") from e
    if "latents" not in arrays:
        raise ValueError(f"--latents {path} has no 'latents' array (found {sorted(arrays) or 'no npz'})")
    return arrays["latents"]


def read_loras(args) -> list:
    """[(folder, scale), ...] of --lora / --lora-scale, each folder's files checked."""
    return lora_files.folders_and_scales(args.lora, args.lora_scale, "--lora")


def main(argv=None):
    args = parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    else:  # the pipeline's warnings (empty prompt, words the model never saw) as one line each
        logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    prompts = read_prompts(args)
    overrides = {
        field: getattr(args, flag) for flag, field in SAMPLING_FLAGS.items() if getattr(args, flag) is not None
    }
    overrides |= {"guide_all_channels": args.cfg_all_channels, "smooth_rope": args.smooth_rope,
                  "proportional_attn": not args.no_proportional_attn}  # fmt: skip
    SampleSettings(**overrides).validate(1)  # what the flags' types did not check
    single = check_outputs(args, len(prompts))
    latents = read_latents(args.latents)
    loras = read_loras(args)
    overrides |= check_model(args)  # the last check: it reads the model's config files
    backend.set_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    rank, world = data_parallel_world()
    if world > 1 and single:
        raise ValueError(f"--out {args.out} names one file, but msrun started {world} workers; name a folder")
    mine = list(range(rank, len(prompts), world))  # msrun: every world-th prompt, noise seeded with seed + rank
    if not mine:
        print(f"rank {rank}: no prompt left for this worker ({len(prompts)} prompts, {world} workers)")
        return
    seed = args.seed + rank
    if latents is not None and world > 1:
        if len(latents) != len(prompts):
            raise ValueError(f"--latents holds {len(latents)} noise samples for {len(prompts)} prompts")
        latents = latents[mine]
    offload = {"auto": None, "on": True, "off": False}[args.offload]
    pipe = TextToImagePipeline.from_pretrained(args.model, args.dtype, args.text_encoder, args.vae, offload)
    for path, scale in loras:
        pipe.load_lora(path, scale)
    settings = dataclasses.replace(pipe.defaults, **overrides)
    settings.validate(pipe.size_multiple)  # a hub id's sizes: before any sampling
    result = pipe([prompts[i] for i in mine], args.negative_prompt, seed=seed, latents=latents, settings=settings)
    run_info = {"negative_prompt": args.negative_prompt, "seed": seed, "model": args.model, "dtype": args.dtype,
                "text_encoder": args.text_encoder, "vae": args.vae, "latents": args.latents,
                "lora": [{"path": p, "scale": sc} for p, sc in loras] or None}  # fmt: skip
    for i, image in zip(mine, result.images):
        prompt = prompts[i]
        path = single or os.path.join(args.out, f"{i:03d}_{cli.slug(prompt)}_seed{seed}.png")
        info = {"prompt": prompt, **{k: v for k, v in run_info.items() if v is not None},
                "settings": vars(settings) | {"height": image.height, "width": image.width}}  # fmt: skip
        print(f"wrote {cli.save_png(image, path, info, args.overwrite, counter=single is None)}")
    if args.save_latents:
        with atomic_path(args.save_latents, replace=args.overwrite) as tmp, open(tmp, "wb") as f:
            np.savez(f, latents=result.latents)
        print(f"wrote {args.save_latents}")


if __name__ == "__main__":
    cli.run(main)
