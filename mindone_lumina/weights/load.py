"""Strict, streaming loading into a Cell: the one way weights reach parameters.

A loader builds the Cell with ``empty`` (no parameter memory is allocated), checks names and shapes of a plan of
``TensorSpec``s (``rules.convert_tensors``) against it, and then fills one parameter at a time in the requested dtype:
peak memory is the model plus one tensor, whatever the checkpoint's size or dtype. Missing, unexpected and mis-shaped
keys raise ``ValueError`` naming them, before any parameter is touched.
"""

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
