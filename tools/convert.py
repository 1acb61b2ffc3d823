"""Convert Lumina weights between the original Lumina-T2X, diffusers and MindSpore (project) formats.

    python tools/convert.py SRC OUT [--arch PRESET_OR_JSON] [--dtype keep|fp32|fp16|bf16] [--ema]
        [--to mindspore|original|diffusers] [--verify] [--force] [--allow-inexact-merge]
        [--merge-lora ADAPTER [--lora-scale S]]...

SRC: a ``consolidated[_ema].NN-of-MM.{safetensors,pth}`` file or folder (model-parallel ranks are merged), a diffusers
pipeline or ``transformer/`` folder (single or sharded, fp32 or bf16), or a project safetensors file. A Lumina-T2I
(Flag-DiT) checkpoint, recognised by its ``eol_token``, converts the same way to mindspore or original (there is no
diffusers Flag-DiT). OUT: a ``.safetensors`` file for ``--to mindspore``; a folder for ``original``
(consolidated.00-of-01.safetensors + model_args.json) and ``diffusers`` (transformer/diffusion_pytorch_model.safetensors
+ config.json). A whole pipeline folder SRC with ``--to diffusers`` is rewritten as a whole (e.g. one saved by
mindone-lumina 0.1), tensors bit-identical. ``.pth`` files are read without torch and without running pickle code.
Strict: any missing, unexpected or mis-shaped key is an error. ``--verify`` re-reads the output and compares every
tensor with its source, bit for bit.

``--merge-lora`` folds LoRA adapters (peft folders; repeat the flag for several, each with its ``--lora-scale``) into
the weights, ``W + sum s B A`` computed in fp32, for deployment with no extra cost per step: the model is built in
fp32 to merge (peak memory: the model in fp32), each tensor written in its source dtype (or ``--dtype``). An adapter
that changes the self- and cross-attention queries differently gives a model with separate queries (diffusers
layout). With a pipeline folder SRC and ``--to diffusers`` the whole pipeline is written, the transformer merged and
the adapters' words added to its vocabulary. ``--verify`` then compares the written tensors with the merged ones.
"""

import os
import time

from tqdm import tqdm

from mindone_lumina import cli, components
from mindone_lumina.io import diffusers_io
from mindone_lumina.weights import lora as lora_files
from mindone_lumina.weights.nextdit import NEXTDIT
from mindone_lumina.weights.safetensors import verify_safetensors
from mindone_lumina.weights.tensors import CASTS

FORMATS = ("mindspore", "original", "diffusers")


def parser():
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="checkpoint file or folder")
    p.add_argument("out", help="output .safetensors file (mindspore) or folder (original, diffusers)")
    p.add_argument("--arch", default=None, help="preset or JSON of constructor arguments (default: read from SRC)")
    p.add_argument("--dtype", default="keep", choices=CASTS, help="cast floating tensors")
    p.add_argument("--ema", action="store_true", help="read consolidated_ema.* instead of consolidated.*")
    p.add_argument("--to", default="mindspore", choices=FORMATS, help="output format")
    p.add_argument("--verify", action="store_true", help="re-read the output and compare every tensor")
    p.add_argument("--force", action="store_true", help="overwrite existing output")
    p.add_argument(
        "--allow-inexact-merge", action="store_true", help="merge model-parallel ranks despite per-rank qk norms"
    )
    p.add_argument("--merge-lora", action="append", metavar="ADAPTER", help="a LoRA adapter folder to merge into the "
                   "weights; repeat for several (default: none)")  # fmt: skip
    p.add_argument("--lora-scale", action="append", type=float, metavar="S", help="scale of each --merge-lora, in "
                   "order; one value applies to all (default: 1)")  # fmt: skip
    return p


def read_loras(args) -> list:
    """[(folder, scale), ...] of --merge-lora / --lora-scale, each folder's files checked."""
    return lora_files.folders_and_scales(args.merge_lora, args.lora_scale, "--merge-lora")


def check_paths(args) -> None:
    """SRC must exist and OUT be writable (absent unless --force), before anything is read."""
    cli.existing(args.src, "SRC")
    if args.to == "mindspore" and not args.out.endswith(".safetensors"):
        raise ValueError(f"output {args.out} for the mindspore format must be a .safetensors file path")
    if args.to != "mindspore" and args.out.endswith(".safetensors"):
        raise ValueError(f"output {args.out} for the {args.to} format must be a folder, not a .safetensors file")
    if args.to == "mindspore":
        cli.output_file(args.out, "OUT", args.force, "--force")
    else:
        cli.output_folder(args.out, "OUT")


def main(argv=None):
    args = parser().parse_args(argv)
    check_paths(args)
    loras = read_loras(args)
    if diffusers_io.is_pipeline(args.src) and args.to == "diffusers":
        folder = diffusers_io.rewrite_pipeline(args.src, args.out, merge=_merger(loras) if loras else None)
        print(f"wrote {folder.describe()}" + (f" with {len(loras)} LoRA adapter(s) merged" if loras else ""))
        return
    family, cfg, specs = components.transformer_plan(
        args.src, args.arch, args.ema, args.dtype, args.allow_inexact_merge
    )
    if loras:
        components.check_loras(loras, cfg)  # names and shapes, before the model is built
        cfg, specs, _ = components.merge_loras(family, cfg, specs, loras)
        print(f"merged {len(loras)} LoRA adapter(s): " + ", ".join(f"{p} x {s:g}" for p, s in loras))
    if args.to == "diffusers" and family is not NEXTDIT:
        raise ValueError(
            f"{family.name} converts to mindspore or original, not diffusers (there is no diffusers {family.name})"
        )
    written = specs if args.to == "mindspore" else family.export(specs, cfg, args.to)  # what lands in the file
    total = sum(s.nbytes for s in written)
    start = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="convert") as bar:
        if args.to == "diffusers":
            out = os.path.join(args.out, "transformer")
            path = diffusers_io.write_transformer(out, specs, cfg, 128, args.force, bar.update)  # 1024 px latent side
        else:
            path = family.write(specs, cfg, args.out, args.force, bar.update)
    mb, seconds = total / 1e6, time.perf_counter() - start
    print(f"wrote {path}: {len(written)} tensors, {mb:.1f} MB in {seconds:.1f} s ({mb / seconds:.0f} MB/s)")
    if args.verify:
        verify_safetensors(path, written)
        print(f"verified {len(written)} tensors of {path} against {args.src}: bit-identical")


def _merger(loras):
    def merge(family, cfg, specs):
        components.check_loras(loras, cfg)
        return components.merge_loras(family, cfg, specs, loras)

    return merge


if __name__ == "__main__":
    cli.run(main)
