"""Run one Next-DiT forward (or the original CFG forward) on your own checkpoint and inputs, for parity checks.

    python tools/forward.py --checkpoint consolidated.00-of-01.safetensors --arch model_args.json \
        --inputs in.npz --output out.npz [--mode graph] [--dtype fp32] [--cfg-scale 4] \
        [--scale-factor 1.5 --scale-watershed 0.3] [--base-seqlen 4096]

``in.npz`` holds ``x`` (B, C, H, W), ``t`` (B,) with t=0 noise / t=1 data, ``cap_feats`` (B, Lc, D) and ``cap_mask``
(B, Lc); ``out.npz`` gets ``out``. ``--checkpoint`` takes every format ``tools/convert.py`` reads (original
safetensors/.pth, model-parallel shards, diffusers folders, fp32 or bf16), streamed into the model; ``--arch`` may be
left out when the checkpoint records its architecture. With ``--cfg-scale`` the original ``forward_with_cfg`` runs.

``--family flagdit`` runs a Lumina-T2I Flag-DiT (original ``consolidated.*`` or project safetensors) instead, with
its own RoPE scaling ``--rope-scaling-factor`` / ``--ntk-factor`` (``--base-seqlen`` as above).
"""

import numpy as np

import mindspore as ms
from mindspore import Tensor

from mindone_lumina import backend, cli, components, sampling
from mindone_lumina.atomic import atomic_path
from mindone_lumina.dtypes import ms_dtype
from mindone_lumina.models import flagdit, nextdit


def parser():
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="any checkpoint tools/convert.py reads (original, diffusers)")
    p.add_argument("--arch", default=None, help="preset or JSON of the original constructor's arguments (default: "
                   "the architecture recorded with the checkpoint)")  # fmt: skip
    p.add_argument("--inputs", required=True, help="npz with x, t, cap_feats, cap_mask")
    p.add_argument("--output", required=True, help="npz to write (key 'out'; an existing file is replaced)")
    p.add_argument("--family", default="nextdit", choices=["nextdit", "flagdit"], help="DiT family")
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"], help="MindSpore execution mode")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights and compute dtype")
    p.add_argument("--device", default="CPU", choices=["CPU", "Ascend"], help="device to run on")
    p.add_argument("--cfg-scale", type=cli.number(0), default=None,
                   help="run the original forward_with_cfg with this scale (default: a plain forward)")  # fmt: skip
    p.add_argument("--scale-factor", type=cli.number(above=0), default=1.0,
                   help="RoPE extrapolation factor (default: 1 = off)")  # fmt: skip
    p.add_argument("--scale-watershed", type=cli.number(0, 1), default=1.0,
                   help="t below which PI is used, NTK above (default: 1)")  # fmt: skip
    p.add_argument("--base-seqlen", type=cli.integer(1), default=None,
                   help="turn proportional attention on with this base (default: off)")  # fmt: skip
    p.add_argument("--rope-scaling-factor", type=cli.number(above=0), default=None,
                   help="flagdit: divide RoPE positions by this (default: the model config's)")  # fmt: skip
    p.add_argument("--ntk-factor", type=cli.number(above=0), default=None,
                   help="flagdit: multiply the RoPE theta by this (default: the model config's)")  # fmt: skip
    return p


def read_inputs(path):
    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read inputs {path}: {e}") from e
    missing = [k for k in ("x", "t", "cap_feats", "cap_mask") if k not in data]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it must hold x, t, cap_feats and cap_mask")
    return {k: data[k] for k in ("x", "t", "cap_feats", "cap_mask")}


def main(argv=None):
    args = parser().parse_args(argv)
    if args.family == "flagdit" and (args.scale_factor, args.scale_watershed) != (1.0, 1.0):
        raise ValueError("--scale-factor/--scale-watershed are Next-DiT's; Flag-DiT uses --rope-scaling-factor "
                         "and --ntk-factor")  # fmt: skip
    if args.family == "nextdit" and (args.rope_scaling_factor, args.ntk_factor) != (None, None):
        raise ValueError("--rope-scaling-factor/--ntk-factor are Flag-DiT's (--family flagdit)")
    cli.existing(args.checkpoint, "--checkpoint")
    cli.output_file(args.output, "--output", overwrite=True)
    inputs = read_inputs(cli.existing(args.inputs, "--inputs", "file"))
    backend.set_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    dtype = ms_dtype(args.dtype)
    model = components.load_transformer(args.checkpoint, dtype, args.arch)
    family = flagdit if args.family == "flagdit" else nextdit
    if not isinstance(model.cfg, flagdit.FlagDiTConfig if args.family == "flagdit" else nextdit.NextDiTConfig):
        raise ValueError(f"{args.checkpoint} holds a {type(model).__name__}, not a {args.family} (--family)")
    if args.family == "flagdit":
        scaling = flagdit.RopeScaling(args.rope_scaling_factor, args.ntk_factor, args.base_seqlen)
    else:
        scaling = nextdit.RopeScaling(args.scale_factor, args.scale_watershed, base_seqlen=args.base_seqlen)

    x, cap = Tensor(inputs["x"]).astype(dtype), Tensor(inputs["cap_feats"]).astype(dtype)
    t, mask = Tensor(inputs["t"].astype(np.float32)), Tensor(inputs["cap_mask"])

    def run(x):
        return family.forward(model, x, t, cap, mask, scaling)

    out = run(x) if args.cfg_scale is None else sampling.forward_with_cfg(run, x, args.cfg_scale)
    with atomic_path(args.output) as tmp, open(tmp, "wb") as f:
        np.savez(f, out=out.astype(ms.float32).asnumpy())
    print(f"wrote {args.output}: out {tuple(out.shape)} ({args.mode}, {args.dtype})")


if __name__ == "__main__":
    cli.run(main)
