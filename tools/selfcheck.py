"""Prove the port on this device: every component against the golden bundle, the kernel contracts, and the speed.

    python tools/selfcheck.py [--device Ascend|CPU] [--golden DIR] [--dtypes fp32,fp16,bf16] [--speed ARCH|off]

Needs no torch. Runs in graph mode on ``--device`` (on Ascend through the fused flash-attention, RMSNorm and rotary
kernels; ``MINDONE_LUMINA_PORTABLE=1`` forces the portable ops there): Next-DiT (three cases: plain, scaled RoPE with
position interpolation and with NTK, proportional attention), Flag-DiT, Gemma, the VAE decode, three guided sampling
steps of the whole pipeline and one training step (loss and every gradient), each in every ``--dtypes`` against the
fp32 PyTorch reference in the bundle (``mindone_lumina/golden.py``; default: the copy shipped in the package) with the
budgets of ``mindone_lumina/tolerances.py``. The kernel contracts run the backend's argument preparation through
NumPy emulators of the fused kernels' documented semantics (and, on Ascend, the real kernels against the emulators).
Then one Next-DiT evaluation at 1024² (batch 2, random weights) is timed for ``--speed`` (default: the released 2B
shape, nextdit-2b-gqa; ``golden``: the bundle's tiny model at the same token count; ``off``).

Prints a result table and a speed table (markdown, as ``benchmarks/README.md``), writes them to ``--out`` if given, and
exits 1 naming every failed component. Under msrun every rank checks its own device and tags its output with its rank.
"""

import platform
import sys
from datetime import datetime, timezone

import mindspore as ms

from mindone_lumina import backend, cli, golden, selfcheck
from mindone_lumina.dtypes import ms_dtype
from mindone_lumina.training.loop import data_parallel_world

DTYPES = ("fp32", "fp16", "bf16")


def parser():
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="CPU", choices=["CPU", "Ascend"], help="device to check")
    p.add_argument("--golden", default=golden.SHIPPED, help="golden bundle folder (tools/make_golden.py)")
    p.add_argument("--dtypes", default=None, help=f"comma-separated subset of {','.join(DTYPES)} (default: fp32,fp16, "
                   "and bf16 on Ascend)")  # fmt: skip
    p.add_argument("--components", default=",".join(selfcheck.COMPONENTS),
                   help=f"comma-separated subset of {','.join(selfcheck.COMPONENTS)}")  # fmt: skip
    p.add_argument("--speed", default="nextdit-2b-gqa", choices=[*selfcheck.SPEED_ARCHS, "off"],
                   help="Next-DiT shape to time at 1024²")  # fmt: skip
    p.add_argument("--speed-dtype", default=None, help="dtype of the timing (default: bf16 on Ascend, fp32 on CPU)")
    p.add_argument("--repeats", type=cli.integer(1), default=3, help="timed evaluations after the compiling one")
    p.add_argument("--out", default=None, help="also write the tables to this markdown file (msrun rank N: to "
                   "FILE.rankN) (default: print only)")  # fmt: skip
    return p


def _subset(text: str, valid: tuple, flag: str) -> tuple:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in items if s not in valid]
    if unknown or not items:
        raise ValueError(f"{flag}: unknown or empty {unknown or text!r}; choose from {','.join(valid)}")
    return items


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    default_dtypes = "fp32,fp16,bf16" if args.device == "Ascend" else "fp32,fp16"
    dtypes = _subset(args.dtypes or default_dtypes, DTYPES, "--dtypes")
    parts = _subset(args.components, selfcheck.COMPONENTS, "--components")
    speed_dtype = args.speed_dtype or ("bf16" if args.device == "Ascend" else "fp32")
    _subset(speed_dtype, DTYPES, "--speed-dtype")
    bundle = golden.Bundle(cli.existing(args.golden, "--golden", "folder"))
    if args.out is not None:
        cli.output_file(args.out, "--out", overwrite=True)
    backend.set_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE)
    for d in dtypes + (() if args.speed == "off" else (speed_dtype,)):  # bf16 on CPU: refused before any work
        backend.check_dtype_supported(ms_dtype(d))
    rank, world = data_parallel_world()

    rows = selfcheck.run(bundle, dtypes, parts)
    command = "python tools/selfcheck.py " + " ".join(argv if argv is not None else sys.argv[1:])
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()} {platform.processor() or platform.system()}"
    header = (f"Self-check of mindone-lumina on {args.device} (rank {rank} of {world}), MindSpore {ms.__version__}, "
              f"{machine}, {when}; bundle {bundle.folder}")  # fmt: skip
    text = [header, "", selfcheck.table(rows)]
    if args.speed != "off":  # a failed timing is a failed row, after the component table it must not lose
        try:
            result = selfcheck.speed(bundle, args.speed, speed_dtype, repeats=args.repeats)
            text += ["", selfcheck.speed_table([result], args.device, command)]
        except Exception as e:  # noqa: BLE001
            rows.append(selfcheck.Row("speed", args.speed, speed_dtype, float("nan"), 0.0, cli.one_line(e)))
    failed = [r for r in rows if not r.passed]
    verdict = "PASS" if not failed else "FAIL: " + ", ".join(sorted({r.component for r in failed}))
    text += ["", f"{verdict} ({len(rows) - len(failed)}/{len(rows)} rows within budget)"]
    for r in failed:
        text.append(f"FAIL {r.component} {r.case} {r.dtype}: error {r.error:.3e} > budget {r.budget:.2g} {r.detail}")
    report = "\n".join(text) + "\n"
    print(report if world == 1 else "".join(f"[rank {rank}] {line}\n" for line in report.splitlines()), end="")
    if args.out is not None:
        path = args.out if world == 1 else f"{args.out}.rank{rank}"
        cli.write_new(path, lambda tmp: _write(tmp, report), overwrite=True, counter=False)
    return 1 if failed else 0


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    cli.run(main)
