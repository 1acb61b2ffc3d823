"""Per-block, per-component, per-step parity of the MindSpore port against the PyTorch reference (diffusers 0.35.2).

    python tools/parity_report.py [--model DIR] [--dtypes fp32,fp16] [--modes graph,pynative] [--out DIR]

``--model`` is a diffusers-layout folder (``model_index.json``); without it a tiny random model is built in ``--out``.
Writes ``report.md``, ``errors_blocks.png`` and ``errors_steps.png`` to ``--out`` and exits with status 1 when a
budget (``mindone_lumina.tolerances.BUDGETS``) is broken.
"""

from mindone_lumina import backend, cli, parity


def parser():
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="diffusers-layout folder (default: a tiny random model)")
    p.add_argument("--dtypes", default="fp32,fp16", help=f"comma-separated subset of {','.join(parity.DTYPES)}")
    p.add_argument("--modes", default="graph,pynative", help=f"comma-separated subset of {','.join(parity.MODES)}")
    p.add_argument("--out", default="parity-report", help="output folder")
    p.add_argument("--device", default="CPU", choices=["CPU", "Ascend"], help="device to run on")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.model is not None:
        cli.existing(args.model, "--model", "folder")
    cli.output_folder(args.out, "--out")
    backend.set_device(args.device)
    report = parity.run(args.model, args.dtypes.split(","), args.modes.split(","), args.out)
    failed = [r for r in report.rows if not r.passed]
    for r in failed[:10]:
        print(f"FAIL {r.dtype} {r.mode} {r.component} {r.index}: {r.rel:.3e} > {r.budget:.2g}")
    print(f"{'PASS' if report.passed else 'FAIL'}: {len(report.rows) - len(failed)}/{len(report.rows)} rows within "
          f"budget; report in {args.out}/report.md")  # fmt: skip
    return 0 if report.passed else 1


if __name__ == "__main__":
    cli.run(main)
