"""Declarative weight renaming between PyTorch checkpoint layouts and the project's parameter names.

A ``RuleTable`` is a list of ``(project_pattern, source_patterns)`` rows. ``{i}`` in a pattern matches a layer index.
Converting *to* the project consumes every source key exactly once: a key no rule matches is *unexpected*, a project
key no source provides is *missing*, and when several source keys feed one project key (diffusers stores Next-DiT's
``wq`` and ``q_norm`` twice) the copies must be bit-identical. Converting *from* the project writes every source key.
No transposes are needed anywhere in Lumina-Next (torch Linear and MindSpore Dense are both (out, in)).
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RuleTable:
    name: str
    rules: tuple  # ((project_pattern, (source_pattern, ...)), ...)

    def __post_init__(self):
        for project, sources in self.rules:
            if not sources:
                raise ValueError(f"{self.name}: rule for {project!r} has no source pattern")

    def _compiled(self):
        out = []
        for project, sources in self.rules:
            for src in sources:
                out.append((re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"), project, src))
        return out

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
            regex = re.compile("^" + re.escape(project).replace(r"\{i\}", r"(\d+)") + "$")
            m = regex.match(project_key)
            if m:
                return [s.replace("{i}", m.group(1)) if m.groups() else s for s in sources]
        return []


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
