"""Run one Next-DiT forward (or the original CFG forward) on your own checkpoint and inputs, for parity checks.

    python tools/forward.py --checkpoint consolidated.00-of-01.safetensors --arch model_args.json \
        --inputs in.npz --output out.npz [--mode graph] [--dtype fp32] [--cfg-scale 4] \
        [--scale-factor 1.5 --scale-watershed 0.3] [--base-seqlen 4096]

``in.npz`` holds ``x`` (B, C, H, W), ``t`` (B,) with t=0 noise / t=1 data, ``cap_feats`` (B, Lc, D) and ``cap_mask``
(B, Lc); ``out.npz`` gets ``out``. ``--checkpoint`` takes every format ``tools/convert.py`` reads (original
safetensors/.pth, model-parallel shards, diffusers folders, fp32 or bf16), converted in memory; ``--arch`` may be
left out when the checkpoint records its architecture. With ``--cfg-scale`` the original ``forward_with_cfg`` runs.

``--family flagdit`` runs a Lumina-T2I Flag-DiT (original ``consolidated.*`` or project safetensors) instead, with
its own RoPE scaling ``--rope-scaling-factor`` / ``--ntk-factor`` (``--base-seqlen`` as above).
"""

import argparse
import os
import tempfile

import numpy as np

import mindspore as ms
from mindspore import Tensor

from mindone_lumina import backend, flagdit, flagdit_weights, nextdit, nextdit_weights
from mindone_lumina.layers import cast_parameters
from mindone_lumina.loading import load_state_dict


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint", required=True, help="any Next-DiT checkpoint the converter reads (original, diffusers)"
    )
    p.add_argument("--arch", default=None, help="preset or JSON of the original constructor's arguments (default: "
                   "the architecture recorded with the checkpoint)")  # fmt: skip
    p.add_argument("--inputs", required=True, help="npz with x, t, cap_feats, cap_mask")
    p.add_argument("--output", required=True, help="npz to write (key 'out')")
    p.add_argument("--family", default="nextdit", choices=["nextdit", "flagdit"])
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default="CPU", choices=["CPU", "Ascend"])
    p.add_argument("--cfg-scale", type=float, default=None, help="run the original forward_with_cfg with this scale")
    p.add_argument("--scale-factor", type=float, default=1.0, help="RoPE extrapolation factor (1 = off)")
    p.add_argument("--scale-watershed", type=float, default=1.0, help="t below which PI is used, NTK above")
    p.add_argument("--base-seqlen", type=int, default=None, help="turn proportional attention on with this base")
    p.add_argument("--rope-scaling-factor", type=float, default=None, help="flagdit: divide RoPE positions by this")
    p.add_argument("--ntk-factor", type=float, default=None, help="flagdit: multiply the RoPE theta by this")
    return p.parse_args(argv)


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
    args = parse_args(argv)
    ms.set_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    dtype = backend.dtype_from_name(args.dtype)
    backend.check_dtype_supported(dtype)

    family = flagdit if args.family == "flagdit" else nextdit
    if args.family == "flagdit":
        if (args.scale_factor, args.scale_watershed) != (1.0, 1.0):
            raise ValueError("--scale-factor/--scale-watershed are Next-DiT's; Flag-DiT uses --rope-scaling-factor "
                             "and --ntk-factor")  # fmt: skip
        scaling = flagdit.RopeScaling(args.rope_scaling_factor, args.ntk_factor, args.base_seqlen)
        cfg = flagdit_weights.resolve(args.checkpoint, args.arch)
        model, state = flagdit.FlagDiT(cfg), flagdit_weights.load_flagdit_state(args.checkpoint, cfg)
    else:
        if (args.rope_scaling_factor, args.ntk_factor) != (None, None):
            raise ValueError("--rope-scaling-factor/--ntk-factor are Flag-DiT's (--family flagdit)")
        scaling = nextdit.RopeScaling(args.scale_factor, args.scale_watershed, base_seqlen=args.base_seqlen)
        cfg = nextdit_weights.resolve(args.checkpoint, args.arch)
        model, state = nextdit.NextDiT(cfg), nextdit_weights.load_nextdit_state(args.checkpoint, cfg)
    inputs = read_inputs(args.inputs)
    load_state_dict(model, state, what=args.checkpoint)
    cast_parameters(model, dtype)

    x = Tensor(inputs["x"]).astype(dtype)
    cap = Tensor(inputs["cap_feats"]).astype(dtype)
    t, mask = Tensor(inputs["t"].astype(np.float32)), Tensor(inputs["cap_mask"])
    if args.cfg_scale is None:
        out = family.forward(model, x, t, cap, mask, scaling)
    else:
        out = family.forward_with_cfg(model, x, t, cap, mask, args.cfg_scale, scaling)

    out_dir = os.path.dirname(os.path.abspath(args.output))
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, out=out.astype(ms.float32).asnumpy())
    os.replace(tmp.name, args.output)
    print(f"wrote {args.output}: out {tuple(out.shape)} ({args.mode}, {args.dtype})")


if __name__ == "__main__":
    main()
