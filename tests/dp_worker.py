"""Run by msrun from tests/test_training.py: trains one recipe data-parallel and saves this rank's result.

dp_worker.py RECIPE OUT [--split]     --split: train half the steps, stop ("killed"), resume (state goes through a
checkpoint); what the rank saw and its losses are saved over both runs.
"""

import sys

import numpy as np

from mindone_lumina import backend
from mindone_lumina.training import TrainConfig, data_parallel_world, train

recipe, out = sys.argv[1], sys.argv[2]
backend.set_device("CPU")
rank, world = data_parallel_world()  # what tools/train.py does under msrun
assert world == 2, world
cfg = TrainConfig.from_yaml(recipe, output=f"{out}/run")  # one output folder, as on a cluster: rank 0 saves
seen, history = [], []
if "--split" in sys.argv:
    first = train(cfg, rank, world, stop_after=cfg.steps // 2)
    seen, history = first.seen, first.history
trainer = train(cfg, rank, world)
weights = {n: p.asnumpy() for n, p in zip(trainer.param_names, trainer.params)}
rows = np.array([m.shape[0] for m in trainer.optimizer.moments1])  # this rank's rows of each first moment
seen, losses = seen + trainer.seen, [loss for _, loss, _ in history + trainer.history]
np.savez(f"{out}/rank{rank}.npz", seen=np.array(seen), losses=np.array(losses), moment_rows=rows, **weights)
