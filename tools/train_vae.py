"""Train a small AutoencoderKL (diffusers layout) on a folder of images, for a Next-DiT recipe's ``vae:``.

    python tools/train_vae.py --config configs/shapes-vae.yaml [--output runs/x] [--steps N] [--export DIR]
    msrun --worker_num=2 --local_worker_num=2 --join=True --log_dir=logs python tools/train_vae.py --config ...

Resumes from ``OUTPUT/checkpoints/latest`` when it exists. ``--export`` writes the diffusers ``vae/`` folder (EMA
weights, fitted ``scaling_factor``).
"""

from mindone_lumina import cli
from mindone_lumina.training import run_tool
from mindone_lumina.training.loop import tool_parser
from mindone_lumina.training.vae import VAETrainConfig, export_vae, train_vae


def parser():
    return tool_parser(__doc__.splitlines()[0], VAETrainConfig)


def _export(cfg, trainer, folder):
    return f"scaling_factor {export_vae(cfg, trainer, folder):.5f}"


def main(argv=None):
    run_tool(__doc__.splitlines()[0], VAETrainConfig, train_vae, _export, argv, convolutions=True)


if __name__ == "__main__":
    cli.run(main)
