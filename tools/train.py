"""Train or fine-tune Next-DiT with flow matching.

    python tools/train.py --config configs/shapes-demo.yaml [--output runs/x] [--init CKPT] [--export DIR]
    msrun --worker_num=2 --local_worker_num=2 --join=True --log_dir=logs python tools/train.py --config ...

Resumes from ``OUTPUT/checkpoints/latest`` when it exists. ``--init`` fine-tunes from a Lumina-Next checkpoint in any
format ``tools/convert.py`` reads. ``--export`` writes a pipeline folder for ``tools/sample.py --model``.
"""

from mindone_lumina import cli
from mindone_lumina.training import TrainConfig, export_pipeline, run_tool, train
from mindone_lumina.training.loop import tool_parser


def parser():
    return tool_parser(__doc__.splitlines()[0], TrainConfig)


def main(argv=None):
    run_tool(__doc__.splitlines()[0], TrainConfig, train, export_pipeline, argv)


if __name__ == "__main__":
    cli.run(main)
