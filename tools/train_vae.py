"""Train a small AutoencoderKL (diffusers layout) on a folder of images, for a Next-DiT recipe's ``vae:``.

    python tools/train_vae.py --config configs/shapes-vae.yaml [--output runs/x] [--steps N] [--export DIR]
    msrun --worker_num=2 --local_worker_num=2 --join=True --log_dir=logs python tools/train_vae.py --config ...

Resumes from ``OUTPUT/checkpoints/latest`` when it exists. ``--export`` writes the diffusers ``vae/`` folder (EMA
weights, fitted ``scaling_factor``).
"""

import argparse

import mindspore as ms

from mindone_lumina.training import data_parallel_world
from mindone_lumina.vae_training import VAETrainConfig, export_vae, train_vae


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML recipe (keys of VAETrainConfig)")
    p.add_argument("--output", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default="CPU", choices=["CPU", "Ascend"])
    p.add_argument("--export", default=None, help="write the trained VAE (EMA weights) to this folder")
    args = p.parse_args(argv)
    cfg = VAETrainConfig.from_yaml(args.config, output=args.output, data=args.data, steps=args.steps)
    ms.set_device(args.device)
    rank, world = data_parallel_world()
    trainer = train_vae(cfg, rank, world)
    if args.export and rank == 0:
        factor = export_vae(cfg, trainer, args.export)
        print(f"exported {args.export} (scaling_factor {factor:.5f})")


if __name__ == "__main__":
    main()
