"""Run by msrun from tests/test_training.py: trains one recipe data-parallel and saves this rank's result."""

import sys

import numpy as np

import mindspore as ms
from mindspore.communication import get_group_size, get_rank, init

from mindone_lumina.training import TrainConfig, train

recipe, out = sys.argv[1], sys.argv[2]
ms.set_device("CPU")
init()
rank, world = get_rank(), get_group_size()
ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
trainer = train(TrainConfig.from_yaml(recipe, output=f"{out}/run{rank}"), rank, world)
weights = {n: p.asnumpy() for n, p in zip(trainer.param_names, trainer.params)}
np.savez(f"{out}/rank{rank}.npz", seen=np.array(trainer.seen), **weights)
