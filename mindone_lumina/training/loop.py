"""The loop every recipe shares (resume, steps, logging, saving), the data-parallel set-up under msrun, and the
command line of the training tools."""

import dataclasses
import functools
import os
import time

import numpy as np

import mindspore as ms
from mindspore import Tensor

from .. import backend, cli
from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .recipe import Recipe, lr_at
from .sources import read_items
from .step import Trainer


def _progress_bar(start: int, end: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=end, initial=start, disable=not enabled, desc="training", unit="step", leave=False)


def data_parallel_world() -> tuple:
    """(rank, world size): (0, 1) in a plain process; under msrun, communication initialised and data-parallel mode
    set (gradients mean-reduced), one data shard per rank. Call after ``backend.set_device``."""
    if int(os.environ.get("MS_WORKER_NUM", "1")) <= 1:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return get_rank(), get_group_size()


def fit(cfg: Recipe, trainer: Trainer, batches, what: str, rank=0, world=1, log=print, stop_after=None, progress=True,
        data_state=dict):  # fmt: skip
    """The loop every recipe shares: resume from ``output/checkpoints/latest``, run the steps, log, save.

    ``batches(first, last)`` yields micro-batches ``first .. last - 1`` (index ``step * grad_accum + micro``) of this
    rank in order as (Tensors for ``trainer.step``, sample indices). ``data_state()``: what the data reports for the
    checkpoint's state.json (e.g. skipped samples by reason). Returns the trainer with ``history`` (step, loss, lr)
    and ``seen`` (indices).
    """
    start = 0
    resume = latest_checkpoint(cfg.output)
    if resume:
        state = load_checkpoint(resume, trainer)
        start = state["step"]
        if trainer.scaled and "loss_scale" in state:  # fp16: continue with the scaler's state
            trainer.scaler.scale_value.set_data(Tensor(state["loss_scale"], ms.float32))
            trainer.scaler.counter.set_data(Tensor(state["loss_scale_counter"], ms.int32))
        trainer.skipped.set_data(Tensor(state.get("skipped_steps", 0), ms.int32))
        log(f"resumed from {resume} at step {start}")
    log(f"{what}, start step {start}")
    history, seen = [], []
    t_log = time.perf_counter()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = _progress_bar(start, end, enabled=progress and rank == 0)
    stream = iter(batches(start * cfg.grad_accum, end * cfg.grad_accum))
    for step in range(start, end):
        lr = Tensor(lr_at(cfg, step), ms.float32)
        losses = []
        for micro in range(cfg.grad_accum):
            batch, idx = next(stream)
            seen.extend(int(i) for i in idx)
            if micro + 1 < cfg.grad_accum:
                losses.append(float(trainer.accumulate(*batch).asnumpy()))
            else:
                loss, grad_norm = trainer.step(lr, *batch)
                losses.append(float(loss.asnumpy()))
                grad_norm = float(grad_norm.asnumpy())
        bar.update(1)
        history.append((step + 1, float(np.mean(losses)), lr_at(cfg, step)))
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            rate = cfg.log_every * cfg.batch_size * cfg.grad_accum * world / (time.perf_counter() - t_log)
            line = (f"step {step + 1}/{cfg.steps} loss {history[-1][1]:.4f} lr {history[-1][2]:.2e} "
                    f"grad_norm {grad_norm:.3f} {rate:.1f} samples/s")  # fmt: skip
            if trainer.scaled:
                scale = float(trainer.scaler.scale_value.asnumpy())
                line += f" loss_scale {scale:g} skipped {int(trainer.skipped.asnumpy())}"
            log(line)
            t_log = time.perf_counter()
        if (step + 1) % cfg.save_every == 0 or step + 1 == end:
            # under ZeRO gathering the optimizer state is a collective: every rank takes part, rank 0 writes
            opt = trainer.optimizer_state() if rank == 0 or trainer.zero is not None else None
            if rank == 0:
                state = {"history": history[-cfg.save_every :], "skipped_steps": int(trainer.skipped.asnumpy()),
                         **data_state()}  # fmt: skip
                if trainer.scaled:
                    state["loss_scale"] = float(trainer.scaler.scale_value.asnumpy())
                    state["loss_scale_counter"] = int(trainer.scaler.counter.asnumpy())
                save_checkpoint(cfg.output, trainer, step + 1, state, opt)
    bar.close()
    if world > 1:  # every rank leaves after rank 0's last save, so a relaunch resumes from it on every rank
        from mindspore.mint.distributed import barrier

        barrier()
    trainer.history, trainer.seen = history, seen
    return trainer


def tool_parser(description: str, recipe_cls) -> cli.Parser:
    """The command line of a training tool: a YAML recipe, overrides of its keys, the device, the export."""
    p = cli.Parser(description=description)
    p.add_argument("--config", required=True, help=f"YAML recipe (the fields of {recipe_cls.__name__})")
    p.add_argument("--output", default=None, help="run folder (default: the recipe's output)")
    p.add_argument(
        "--data",
        default=None,
        help="data: a folder with captions.jsonl, a .json/.jsonl list or a Lumina .yaml data config "
        "(default: the recipe's data)",
    )
    p.add_argument("--steps", type=cli.integer(1), default=None, help="optimizer steps (default: the recipe's steps)")
    if "init" in {f.name for f in dataclasses.fields(recipe_cls)}:
        p.add_argument("--init", default=None, help="fine-tune from this checkpoint, any format tools/convert.py "
                       "reads (default: the recipe's init, else random weights)")  # fmt: skip
    p.add_argument("--device", default="CPU", choices=["CPU", "Ascend"], help="device to run on")
    p.add_argument("--export", default=None, help="write the trained model (EMA weights) to this folder, which "
                   "must be absent or empty (default: no export)")  # fmt: skip
    return p


def check_run(cfg: Recipe, export: str | None) -> None:
    """What a run needs, checked before any model is loaded or folder made: a readable data list, an existing
    ``init``, a writable run folder, an export folder that the end of the run can fill."""
    if not read_items(cfg.data):
        raise ValueError(f"data {cfg.data} lists no images")
    if cfg.init is not None:
        cli.existing(cfg.init, "init (--init)")
    cli.output_folder(cfg.output, "output (--output)")
    if export:
        cli.output_folder(export, "--export", empty=True)


def run_tool(description: str, recipe_cls, train_fn, export_fn, argv=None, convolutions: bool = False) -> None:
    """The command line of a training tool (``tools/train.py``, ``tools/train_vae.py``): a YAML recipe with
    overrides, the device, msrun data parallel, and an export of the result by rank 0. ``convolutions``: the model is
    mostly convolutions (``convolution.favour_convolutions``)."""
    args = vars(tool_parser(description, recipe_cls).parse_args(argv))
    overrides = {k: args.pop(k) for k in ("output", "data", "steps", "init") if k in args}
    cfg = recipe_cls.from_yaml(args["config"], **overrides)
    check_run(cfg, args["export"])
    backend.set_device(args["device"], convolutions)
    rank, world = data_parallel_world()
    # each log line flushed: a run's stdout is usually a file (msrun's log_dir, nohup) that people follow while it runs
    trainer = train_fn(cfg, rank, world, log=functools.partial(print, flush=True))
    if args["export"] and rank == 0:
        note = export_fn(cfg, trainer, args["export"])
        print(f"exported {args['export']}" + (f" ({note})" if note else ""))
