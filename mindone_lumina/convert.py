"""Declarative weight renaming between PyTorch checkpoint layouts and the project's parameter names.

A ``RuleTable`` is a list of ``(project_pattern, source_patterns)`` rows. ``{i}`` in a pattern matches a layer index.
Converting *to* the project consumes every source key exactly once: a key no rule matches is *unexpected*, a project
key no source provides is *missing*, and when several source keys feed one project key (diffusers stores Next-DiT's
``wq`` and ``q_norm`` twice) the copies must be bit-identical. Converting *from* the project writes every source key.
No transposes are needed anywhere in Lumina-Next (torch Linear and MindSpore Dense are both (out, in)).

``convert_tensors`` applies a table to any reader of ``checkpoint_io`` and returns a streaming plan (``TensorSpec``s
that read their source only when written), after checking names and shapes against the target model. The same
machinery serves every model: pass its table (``nextdit.DIFFUSERS_RULES``, ``gemma.HF_RULES``, ...) and its
expected ``{name: shape}``. ``ShardTable`` says how model-parallel rank files merge.
"""

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .checkpoint_io import TensorSpec, output_dtype, same_bits
from .loading import LoadReport


@dataclass(frozen=True)
class RuleTable:
    name: str
    rules: tuple  # ((project_pattern, (source_pattern, ...)), ...)

    def __post_init__(self):
        for project, sources in self.rules:
            if not sources:
                raise ValueError(f"{self.name}: rule for {project!r} has no source pattern")

    def _compiled(self):
        return [(_pattern(src), project, src) for project, sources in self.rules for src in sources]

    def target_of(self, source_key: str) -> str | None:
        """Project name for one source key, or None when no rule matches."""
        for regex, project, _ in self._compiled():
            m = regex.match(source_key)
            if m:
                return project.replace("{i}", m.group(1)) if m.groups() else project
        return None

    def sources_of(self, project_key: str) -> list[str]:
        """All source keys a project key is written to when exporting."""
        for project, sources in self.rules:
            m = _pattern(project).match(project_key)
            if m:
                return [s.replace("{i}", m.group(1)) if m.groups() else s for s in sources]
        return []


@functools.cache
def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


IDENTITY = None  # a "table" that keeps names (original Lumina-T2X checkpoints use the project's names)


@dataclass(frozen=True)
class RenamePlan:
    """Where each source key goes; computed from key names only, before any tensor is read."""

    targets: dict  # source key -> project key
    duplicates: dict  # source key -> the source key it must equal (consumed, not written)
    unexpected: tuple
    missing: tuple


def plan_rename(source_keys: Iterable[str], table: RuleTable | None, expected: Iterable[str] | None = None):
    """Plan a conversion to project names. ``expected`` (the model's parameter names) enables the missing check."""
    targets, duplicates, first_for, unexpected = {}, {}, {}, []
    for key in sorted(source_keys):
        project = key if table is None else table.target_of(key)
        if project is None:
            unexpected.append(key)
        elif project in first_for:
            duplicates[key] = first_for[project]
        else:
            first_for[project] = key
            targets[key] = project
    missing = () if expected is None else tuple(sorted(set(expected) - set(first_for)))
    if expected is not None:
        unexpected += sorted(k for k, p in targets.items() if p not in set(expected))
        targets = {k: p for k, p in targets.items() if p in set(expected)}
    return RenamePlan(targets, duplicates, tuple(sorted(unexpected)), missing)


def rename_to_project(state: Mapping, table: RuleTable | None, expected: Iterable[str] | None = None, strict=True):
    """Rename a whole in-memory state dict to project names (see ``plan_rename``), checking duplicate copies."""
    plan = plan_rename(state.keys(), table, expected)
    if strict and (plan.unexpected or plan.missing):
        raise ValueError(_describe(plan, table))
    for dup, first in plan.duplicates.items():
        if not np.array_equal(np.asarray(state[dup]), np.asarray(state[first])):
            raise ValueError(f"{dup} should be an exact copy of {first} (diffusers duplicates it) but differs")
    return {plan.targets[k]: state[k] for k in plan.targets}


def rename_from_project(state: Mapping, table: RuleTable | None):
    """Project names -> source layout, duplicating where the layout stores copies."""
    if table is None:
        return dict(state)
    out = {}
    for key, value in state.items():
        names = table.sources_of(key)
        if not names:
            raise ValueError(f"{table.name}: no rule exports project key {key!r}")
        for name in names:
            out[name] = value
    return out


def _describe(plan: RenamePlan, table) -> str:
    name = "identity" if table is None else table.name
    parts = []
    if plan.unexpected:
        parts.append(f"unexpected keys ({len(plan.unexpected)}): {', '.join(plan.unexpected[:20])}")
    if plan.missing:
        parts.append(f"missing keys ({len(plan.missing)}): {', '.join(plan.missing[:20])}")
    return f"checkpoint does not match the {name} layout: " + "; ".join(parts)


# ------------------------------------------------------------------------------------------------------------------
# Streaming conversion of a whole checkpoint
# ------------------------------------------------------------------------------------------------------------------
def check_checkpoint(reader, table: RuleTable | None, expected_shapes: Mapping | None = None):
    """Plan the rename of a checkpoint reader's keys and compare shapes with ``expected_shapes`` (project name ->
    shape), from names and headers only. Returns ``(plan, report)``; ``report.ok`` means a strict load will fit."""
    plan = plan_rename(reader.keys(), table, None if expected_shapes is None else list(expected_shapes))
    mismatched = []
    if expected_shapes is not None:
        for src, project in sorted(plan.targets.items()):
            if tuple(reader.shape(src)) != tuple(expected_shapes[project]):
                mismatched.append(
                    (f"{project} (from {src})" if src != project else src, expected_shapes[project], reader.shape(src))
                )
    for dup, first in sorted(plan.duplicates.items()):
        if tuple(reader.shape(dup)) != tuple(reader.shape(first)):
            mismatched.append((f"{dup} (copy of {first})", reader.shape(first), reader.shape(dup)))
    return plan, LoadReport(plan.missing, plan.unexpected, tuple(mismatched))


def convert_tensors(
    reader,
    table: RuleTable | None,
    expected_shapes: Mapping | None = None,
    dtype: str = "keep",
    strict: bool = True,
    what: str = "checkpoint",
) -> list[TensorSpec]:
    """A streaming plan that renames ``reader``'s tensors to project names and casts them (keep/fp32/fp16/bf16).

    Strict (the default): every source key is consumed exactly once, every expected key is filled, every shape
    matches, or ``ValueError`` names the offending keys. Copies a layout stores twice are compared bit for bit when
    read. Nothing is read here; each returned spec reads its tensor when fetched.
    """
    plan, report = check_checkpoint(reader, table, expected_shapes)
    if strict and not report.ok:
        layout = "identity" if table is None else table.name
        raise ValueError(f"{what} does not match the {layout} layout: {report.describe()}")
    copies = {}
    for dup, first in plan.duplicates.items():
        copies.setdefault(first, []).append(dup)
    bad = {
        p for s, p in plan.targets.items() if expected_shapes and tuple(reader.shape(s)) != tuple(expected_shapes[p])
    }
    return [
        TensorSpec(
            project,
            tuple(reader.shape(src)),
            output_dtype(reader.dtype(src), dtype),
            _reader_with_copies(reader, src, copies.get(src, [])),
        )
        for src, project in sorted(plan.targets.items(), key=lambda kv: kv[1])
        if project not in bad
    ]


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
    right shape but changes the math (e.g. a LayerNorm each rank applied to its own slice only).
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
