"""The declarative weight-rule engine: renames between checkpoint layouts and the project's parameter names.

A ``RuleTable`` is a list of ``(project_pattern, source_patterns)`` rows; ``{i}`` in a pattern matches a layer index.
Converting *to* the project consumes every source key exactly once: a key no rule matches is *unexpected*, a project
key no source provides is *missing*, a shape that differs from the model's is *mis-shaped*, and when several source
keys feed one project key (diffusers stores Next-DiT's ``wq`` and ``q_norm`` twice) the copies must be bit-identical.
Converting *from* the project writes every source key. ``None`` as a table keeps names (the original Lumina-T2X
checkpoints use the project's names). No transposes anywhere: torch Linear and MindSpore Dense are both (out, in).

``convert_tensors`` turns any checkpoint reader into a streaming plan of ``TensorSpec``s checked from names and
headers alone; each spec reads its tensor only when fetched. ``ShardTable`` says how model-parallel rank files merge.
"""

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .tensors import TensorSpec, output_dtype, same_bits


@functools.cache
def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


def _fill(template: str, match: re.Match) -> str:
    return template.replace("{i}", match.group(1)) if match.groups() else template


@dataclass(frozen=True)
class RuleTable:
    name: str
    rules: tuple  # ((project_pattern, (source_pattern, ...)), ...)

    def __post_init__(self):
        for project, sources in self.rules:
            if not sources:
                raise ValueError(f"{self.name}: rule for {project!r} has no source pattern")

    def target_of(self, source_key: str) -> str | None:
        """Project name for one source key, or None when no rule matches."""
        for project, sources in self.rules:
            for src in sources:
                m = _pattern(src).match(source_key)
                if m:
                    return _fill(project, m)
        return None

    def sources_of(self, project_key: str) -> list[str]:
        """All source keys a project key is written to when exporting."""
        for project, sources in self.rules:
            m = _pattern(project).match(project_key)
            if m:
                return [_fill(s, m) for s in sources]
        return []


@dataclass(frozen=True)
class LoadReport:
    """What did not fit: parameter names nobody provides, source keys nobody takes, (name, expected, got) shapes."""

    missing: tuple = ()
    unexpected: tuple = ()
    mismatched: tuple = ()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        def fmt(items):
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


def compare_shapes(expected: Mapping, got: Mapping) -> LoadReport:
    """Compare name -> shape mappings: what ``got`` lacks, has extra, or shapes differently."""
    mismatched = tuple(
        (n, tuple(expected[n]), tuple(got[n]))
        for n in sorted(set(expected) & set(got))
        if tuple(expected[n]) != tuple(got[n])
    )
    return LoadReport(tuple(sorted(set(expected) - set(got))), tuple(sorted(set(got) - set(expected))), mismatched)


def plan_rename(source_keys: Iterable[str], table: RuleTable | None):
    """(targets: source key -> project key, copies: source key -> the source key it must equal, unexpected keys)."""
    targets, copies, first_for, unexpected = {}, {}, {}, []
    for key in sorted(source_keys):
        project = key if table is None else table.target_of(key)
        if project is None:
            unexpected.append(key)
        elif project in first_for:
            copies[key] = first_for[project]
        else:
            first_for[project], targets[key] = key, project
    return targets, copies, unexpected


def check_checkpoint(reader, table: RuleTable | None, expected_shapes: Mapping):
    """Plan the rename of a reader's keys and compare it with ``expected_shapes`` (project name -> shape) from names
    and headers only. Returns ``(targets, copies, report)``; ``report.ok`` means a strict load fits."""
    targets, copies, unexpected = plan_rename(reader.keys(), table)
    got = {project: tuple(reader.shape(src)) for src, project in targets.items()}
    report = compare_shapes(expected_shapes, got)
    named = {p: s for s, p in targets.items()}
    mismatched = [(f"{n} (from {named[n]})" if named[n] != n else n, e, g) for n, e, g in report.mismatched]
    for dup, first in sorted(copies.items()):
        if tuple(reader.shape(dup)) != tuple(reader.shape(first)):
            mismatched.append((f"{dup} (copy of {first})", reader.shape(first), reader.shape(dup)))
    unexpected = sorted(unexpected + [named[p] for p in report.unexpected])
    return targets, copies, LoadReport(report.missing, tuple(unexpected), tuple(mismatched))


def copies_agree(reader, table: RuleTable) -> bool:
    """Whether every pair of tensors ``table`` maps to one project key holds the same bits (reads them)."""
    _, copies, _ = plan_rename(reader.keys(), table)
    return all(same_bits(reader.read(dup), reader.read(first)) for dup, first in copies.items())


def convert_tensors(reader, table: RuleTable | None, expected_shapes: Mapping, dtype="keep", what="checkpoint"):
    """A streaming plan that renames ``reader``'s tensors to project names and casts them (keep/fp32/fp16/bf16).

    Strict: every source key is consumed exactly once, every expected key is filled, every shape matches, or
    ``ValueError`` names the offending keys. Copies a layout stores twice are compared bit for bit when read.
    """
    targets, copies, report = check_checkpoint(reader, table, expected_shapes)
    if not report.ok:
        layout = "identity" if table is None else table.name
        raise ValueError(f"{what} does not match the {layout} layout: {report.describe()}")
    copies_of = {}
    for dup, first in copies.items():
        copies_of.setdefault(first, []).append(dup)
    specs = [
        TensorSpec(project, tuple(reader.shape(src)), output_dtype(reader.dtype(src), dtype),
                   _reader_with_copies(reader, src, copies_of.get(src, [])))
        for src, project in targets.items()
    ]  # fmt: skip
    return sorted(specs, key=lambda s: s.name)


def _reader_with_copies(reader, key: str, copies: list):
    def fetch():
        value = reader.read(key)
        for dup in copies:
            if not same_bits(reader.read(dup), value):
                raise ValueError(f"{dup} should be an exact copy of {key} (the layout stores it twice) but differs")
        return value

    return fetch


def export_tensors(specs: list[TensorSpec], table: RuleTable | None) -> list[TensorSpec]:
    """Project-named specs -> specs named for a layout; keys the layout stores twice are written from one read."""
    if table is None:
        return list(specs)
    out = []
    for s in specs:
        names = table.sources_of(s.name)
        if not names:
            raise ValueError(f"{table.name}: no rule exports project key {s.name!r}")
        out += [TensorSpec(name, s.shape, s.dtype, s.fetch) for name in names]
    return out


@dataclass(frozen=True)
class ShardTable:
    """How model-parallel rank files merge: rows ``(pattern, split_dim, exact)`` with ``{i}`` for a layer index.

    ``split_dim`` None means every rank holds the whole tensor. ``exact`` False marks a tensor whose merge has the
    right shape but changes the math (a LayerNorm each rank applied to its own slice of heads only).
    """

    name: str
    rules: tuple

    def lookup(self, key: str) -> tuple:
        for pattern, dim, exact in self.rules:
            if _pattern(pattern).match(key):
                return dim, exact
        raise ValueError(f"{self.name}: no model-parallel merge rule for {key!r}")

    def split_dim(self, key: str) -> int | None:
        return self.lookup(key)[0]

    def inexact(self, keys) -> list:
        return sorted(k for k in keys if not self.lookup(k)[1])
