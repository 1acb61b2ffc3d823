"""Run by msrun from tests/test_training.py: trains one recipe data-parallel and saves this rank's result.

dp_worker.py RECIPE OUT [--split]     --split: train half the steps, stop, resume (state goes through a checkpoint)
"""

import sys

import numpy as np

import mindspore as ms

from mindone_lumina.training import TrainConfig, data_parallel_world, train

recipe, out = sys.argv[1], sys.argv[2]
ms.set_device("CPU")
rank, world = data_parallel_world()  # what tools/train.py does under msrun
assert world == 2, world
cfg = TrainConfig.from_yaml(recipe, output=f"{out}/run")  # one output folder, as on a cluster: rank 0 saves
if "--split" in sys.argv:
    train(cfg, rank, world, stop_after=cfg.steps // 2)
trainer = train(cfg, rank, world)
weights = {n: p.asnumpy() for n, p in zip(trainer.param_names, trainer.params)}
rows = np.array([m.shape[0] for m in trainer.optimizer.moments1])  # this rank's rows of each first moment
np.savez(f"{out}/rank{rank}.npz", seen=np.array(trainer.seen), moment_rows=rows, **weights)
