"""Convert Next-DiT weights between the original Lumina-T2X, diffusers and MindSpore (project) formats.

A Lumina-T2I (Flag-DiT) checkpoint, recognised by its ``eol_token``, converts the same way to ``mindspore`` or
``original`` (there is no diffusers Flag-DiT).

    python tools/convert.py SRC OUT [--arch PRESET_OR_JSON] [--dtype keep|fp32|fp16|bf16] [--ema]
        [--to mindspore|original|diffusers] [--verify] [--force] [--allow-inexact-merge]

SRC: a ``consolidated[_ema].NN-of-MM.{safetensors,pth}`` file or folder (model-parallel ranks are merged), a
diffusers pipeline or ``transformer/`` folder (single or sharded, fp32 or bf16), or a project safetensors file.
OUT: a ``.safetensors`` file for ``--to mindspore``; a folder for ``original`` (consolidated.00-of-01.safetensors +
model_args.json) and ``diffusers`` (transformer/diffusion_pytorch_model.safetensors + config.json).
``.pth`` files are read without torch and without running pickle code. Strict: any missing, unexpected or mis-shaped
key is an error. ``--verify`` re-reads the output and compares every tensor with its source, bit for bit.
"""

import argparse
import sys
import time

from tqdm import tqdm

from mindone_lumina import checkpoint_io, flagdit_weights, nextdit_weights


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="checkpoint file or folder")
    p.add_argument("out", help="output .safetensors file (mindspore) or folder (original, diffusers)")
    p.add_argument("--arch", default=None, help="preset or JSON of constructor arguments (default: read from SRC)")
    p.add_argument("--dtype", default="keep", choices=list(checkpoint_io.CASTS), help="cast floating tensors")
    p.add_argument("--ema", action="store_true", help="read consolidated_ema.* instead of consolidated.*")
    p.add_argument("--to", default="mindspore", choices=nextdit_weights.FORMATS)
    p.add_argument("--verify", action="store_true", help="re-read the output and compare every tensor")
    p.add_argument("--force", action="store_true", help="overwrite existing output")
    p.add_argument(
        "--allow-inexact-merge", action="store_true", help="merge model-parallel ranks despite per-rank qk norms"
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if flagdit_weights.is_flagdit(args.src, args.ema):  # Lumina-T2I: original names only, no diffusers layout
        flagdit_weights.check_outputs(args.out, args.to, args.force)
        cfg = flagdit_weights.resolve(args.src, args.arch)
        written = flagdit_weights.flagdit_tensors(
            args.src, cfg, args.ema, args.dtype, allow_inexact_merge=args.allow_inexact_merge
        )
        write = flagdit_weights.write_flagdit
    else:
        nextdit_weights.check_outputs(args.out, args.to, args.force)
        cfg = nextdit_weights.resolve(args.src, args.arch)
        specs = nextdit_weights.nextdit_tensors(
            args.src, cfg, args.ema, args.dtype, allow_inexact_merge=args.allow_inexact_merge
        )
        written = nextdit_weights.layout_tensors(specs, args.to)
        write = nextdit_weights.write_nextdit
    total = sum(s.nbytes for s in written)
    start = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="convert") as bar:
        path = write(written, cfg, args.out, args.to, args.force, bar.update)
    mb, seconds = total / 1e6, time.perf_counter() - start
    print(f"wrote {path}: {len(written)} tensors, {mb:.1f} MB in {seconds:.1f} s ({mb / seconds:.0f} MB/s)")
    if args.verify:
        checkpoint_io.verify_safetensors(path, written)
        print(f"verified {len(written)} tensors of {path} against {args.src}: bit-identical")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # a bad input or an existing output: say what, without a traceback
        sys.exit(f"convert.py: error: {e}")
