"""Strict, streaming loading into a Cell: the one way weights reach parameters.

A loader builds the Cell with ``empty`` (no parameter memory is allocated), checks names and shapes of a plan of
``TensorSpec``s (``rules.convert_tensors``) against it, and then fills one parameter at a time in the requested dtype:
peak memory is the model plus one tensor, whatever the checkpoint's size or dtype. Missing, unexpected and mis-shaped
keys raise ``ValueError`` naming them, before any parameter is touched.
"""

import zlib

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn
from mindspore.nn.utils import no_init_parameters

from ..dtypes import file_name
from .rules import compare_shapes, convert_tensors
from .tensors import ArrayCheckpoint, TensorSpec


def empty(factory, *args):
    """``factory(*args)`` with parameters left uninitialised (they are filled by ``load_specs``)."""
    with no_init_parameters():
        return factory(*args)


def named_parameters(cell: nn.Cell) -> dict:
    """Name -> Parameter, names relative to ``cell`` (``Parameter.name`` carries the path of any Cell holding it)."""
    return dict(cell.parameters_and_names())


def param_shapes(cell: nn.Cell) -> dict:
    return {n: tuple(p.shape) for n, p in named_parameters(cell).items()}


def load_specs(cell: nn.Cell, specs: list, what: str = "checkpoint", dtype=None) -> nn.Cell:
    """Fill every parameter of ``cell`` from ``specs`` (strict), stored in ``dtype`` (default: each parameter's)."""
    report = compare_shapes(param_shapes(cell), {s.name: s.shape for s in specs})
    if not report.ok:
        raise ValueError(f"{what} does not match {type(cell).__name__}: {report.describe()}")
    params = named_parameters(cell)
    for spec in specs:
        p = params[spec.name]
        target = dtype or p.dtype
        if p.dtype != target:
            p.set_dtype(target)
        p.set_data(Tensor(spec.fetch(), dtype=target))
    return cell


def load_state_dict(cell: nn.Cell, arrays, table=None, what: str = "state dict") -> nn.Cell:
    """``load_specs`` from an in-memory name -> array mapping, renamed by a ``rules.RuleTable`` if given."""
    return load_specs(cell, convert_tensors(ArrayCheckpoint(arrays), table, param_shapes(cell), what=what), what)


def state_dict(cell: nn.Cell) -> dict:
    """Parameter name -> numpy array (a copy; bfloat16 widened to float32)."""
    widen = lambda p: p.value().astype(ms.float32) if p.dtype == ms.bfloat16 else p  # noqa: E731
    return {n: widen(p).asnumpy() for n, p in named_parameters(cell).items()}


def cell_specs(cell: nn.Cell) -> list:
    """``TensorSpec``s of a Cell's parameters in their own dtypes, read when written (for the writers)."""
    return [TensorSpec(n, tuple(p.shape), file_name(p.dtype), lambda p=p: p.astype(ms.float32).asnumpy())
            for n, p in named_parameters(cell).items()]  # fmt: skip


def random_specs(shapes: dict, norm_offset: float) -> list:
    """Streaming specs of seeded random weights for speed and memory runs (name -> shape): norm weights
    ``norm_offset`` + 0.02 N(0, 1), everything else 0.02 N(0, 1), each tensor drawn from a generator seeded by its
    name, so the values do not depend on the order of loading. With ``empty`` and ``load_specs`` a full-size model
    is built at its own size (a constructor's initialisers hold several copies: 16 GB for the 6.5 GB Next-DiT-2B)."""

    def fetch(name, shape):
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        value = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        return value + norm_offset if "norm" in name and name.endswith("weight") else value

    return [TensorSpec(n, s, "float32", lambda n=n, s=s: fetch(n, s)) for n, s in sorted(shapes.items())]
