"""Strict loading of a name -> array mapping into a Cell, with a report of what did not fit.

Models never touch files; readers (``checkpoint_io``) produce the mapping, the converter renames it, and this module
puts it into the Cell.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn


@dataclass(frozen=True)
class LoadReport:
    missing: tuple = ()  # parameter names of the Cell that the state did not provide
    unexpected: tuple = ()  # state keys the Cell has no parameter for
    mismatched: tuple = field(default=())  # (name, expected shape, got shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        def fmt(items):
            items = list(items)
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            return ", ".join(str(i) for i in items[:limit]) + more

        parts = []
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {fmt(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {fmt(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{n} expected {tuple(e)} got {tuple(g)}" for n, e, g in self.mismatched]
            parts.append(f"mis-shaped keys ({len(shapes)}): {fmt(shapes)}")
        return "; ".join(parts) if parts else "all keys matched"


def compare_shapes(expected: Mapping, state: Mapping) -> LoadReport:
    """Compare ``state`` (name -> array) with ``expected`` (name -> shape)."""
    missing = tuple(sorted(set(expected) - set(state)))
    unexpected = tuple(sorted(set(state) - set(expected)))
    mismatched = tuple(
        (name, tuple(expected[name]), tuple(np.shape(state[name])))
        for name in sorted(set(expected) & set(state))
        if tuple(expected[name]) != tuple(np.shape(state[name]))
    )
    return LoadReport(missing, unexpected, mismatched)


def check_state(cell: nn.Cell, state: Mapping) -> LoadReport:
    """Compare names and shapes of ``state`` with the parameters of ``cell`` without touching either."""
    return compare_shapes({p.name: tuple(p.shape) for p in cell.get_parameters()}, state)


def load_state_dict(cell: nn.Cell, state: Mapping, strict: bool = True, what: str = "checkpoint") -> LoadReport:
    """Copy ``state`` (name -> numpy array or Tensor) into ``cell``'s parameters, cast to each parameter's dtype.

    With ``strict`` (the default) any missing, unexpected or mis-shaped key raises ``ValueError`` naming them, and no
    parameter is modified. Mis-shaped keys are never loaded, even when not strict.
    """
    report = check_state(cell, state)
    if strict and not report.ok:
        raise ValueError(f"{what} does not match {type(cell).__name__}: {report.describe()}")
    bad = {m[0] for m in report.mismatched}
    for p in cell.get_parameters():
        if p.name in state and p.name not in bad:
            value = state[p.name]
            value = value.asnumpy() if isinstance(value, Tensor) else np.asarray(value)
            p.set_data(Tensor(value, dtype=p.dtype))
    return report


def state_dict(cell: nn.Cell) -> dict:
    """Parameter name -> numpy array (a copy)."""
    out = {}
    for p in cell.get_parameters():
        arr = p.value().astype(ms.float32).asnumpy() if p.dtype == ms.bfloat16 else p.asnumpy()
        out[p.name] = arr
    return out
