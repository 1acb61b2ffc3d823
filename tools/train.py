"""Train or fine-tune Next-DiT with flow matching.

    python tools/train.py --config configs/shapes-demo.yaml [--output runs/x] [--init CKPT] [--export DIR]
    msrun --worker_num=2 --local_worker_num=2 --join=True --log_dir=logs python tools/train.py --config ...

Resumes from ``OUTPUT/checkpoints/latest`` when it exists. ``--init`` fine-tunes from a Lumina-Next checkpoint in any
format ``tools/convert.py`` reads. ``--export`` writes a pipeline folder for ``tools/sample.py --model``.
"""

import argparse

import mindspore as ms

from mindone_lumina.training import TrainConfig, data_parallel_world, export_pipeline, train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML recipe (keys of TrainConfig)")
    p.add_argument("--output", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--init", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default="CPU", choices=["CPU", "Ascend"])
    p.add_argument("--export", default=None, help="write the trained pipeline (EMA weights) to this folder")
    args = p.parse_args(argv)
    cfg = TrainConfig.from_yaml(args.config, output=args.output, data=args.data, init=args.init, steps=args.steps)
    ms.set_device(args.device)
    rank, world = data_parallel_world()
    trainer = train(cfg, rank, world)
    if args.export and rank == 0:
        export_pipeline(cfg, trainer, args.export)
        print(f"exported {args.export}")


if __name__ == "__main__":
    main()
