"""Training checkpoints: a folder per save (model, EMA and optimizer safetensors, state.json), written under a
temporary name, with a ``latest`` pointer replaced last, so a kill at any moment leaves ``latest`` complete."""

import json
import os
import shutil
import tempfile

from safetensors.numpy import load_file, save_file

from mindspore import Tensor

from ..atomic import atomic_path, umask
from ..weights.rules import compare_shapes


def save_checkpoint(run: str, trainer, step: int, state: dict, optimizer: dict | None = None) -> str:
    """Write model, EMA and optimizer state to ``checkpoints/step_N`` (via a temporary folder) and then point
    ``checkpoints/latest`` at it; a save killed at any point leaves the previous checkpoint the latest.
    ``optimizer``: the state from ``trainer.optimizer_state()`` when the caller gathered it on every rank."""
    root = os.path.join(run, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:07d}")
    tmp = tempfile.mkdtemp(dir=root, prefix=".saving-")
    try:
        model = {n: p.asnumpy() for n, p in zip(trainer.param_names, trainer.params)}
        ema = {n: e.asnumpy() for n, e in zip(trainer.param_names, trainer.ema)}
        opt = trainer.optimizer_state() if optimizer is None else optimizer
        for name, arrays in (("model", model), ("ema", ema), ("optimizer", opt)):
            save_file(arrays, os.path.join(tmp, f"{name}.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**state, "step": step}, f)
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private
        # saving a step again (a re-run) goes to a new name: the folder "latest" names is never touched before the
        # pointer has moved, so a kill at any moment leaves "latest" naming a complete checkpoint
        version = 1
        while os.path.exists(final if version == 1 else f"{final}.v{version}"):
            version += 1
        target = final if version == 1 else f"{final}.v{version}"
        os.replace(tmp, target)
    except BaseException:  # an error, Ctrl-C or SIGTERM (cli.run) during the save: no half-written folder stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with atomic_path(os.path.join(root, "latest")) as tmp_pointer, open(tmp_pointer, "w") as f:
        f.write(os.path.basename(target))
    superseded = [final] + [f"{final}.v{v}" for v in range(2, version)] if version > 1 else []
    for older in superseded:  # earlier saves of this step, no longer named by "latest"
        shutil.rmtree(older, ignore_errors=True)
    return target


def latest_checkpoint(run: str) -> str | None:
    pointer = os.path.join(run, "checkpoints", "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(run, "checkpoints", f.read().strip())


def load_checkpoint(folder: str, trainer) -> dict:
    """Restore weights, EMA and optimizer state; every file is checked (names, shapes) before anything changes."""
    model = load_file(os.path.join(folder, "model.safetensors"))
    ema = load_file(os.path.join(folder, "ema.safetensors"))
    opt = load_file(os.path.join(folder, "optimizer.safetensors"))
    shapes = {n: tuple(p.shape) for n, p in zip(trainer.param_names, trainer.params)}
    for name, state, expected in (
        ("model", model, shapes),
        ("ema", ema, shapes),
        ("optimizer", opt, trainer.optimizer_shapes()),
    ):
        report = compare_shapes(expected, {k: v.shape for k, v in state.items()})
        if not report.ok:
            raise ValueError(
                f"cannot resume from {folder}: {name}.safetensors does not match this recipe's model "
                f"({report.describe()}); the recipe changed since that run, so use a new output folder or restore it"
            )
    for n, p, e in zip(trainer.param_names, trainer.params, trainer.ema):
        p.set_data(Tensor(model[n], p.dtype))
        e.set_data(Tensor(ema[n], e.dtype))
    trainer.load_optimizer_state(opt)
    with open(os.path.join(folder, "state.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------
