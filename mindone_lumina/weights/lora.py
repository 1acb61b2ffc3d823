"""LoRA adapter folders as ``peft`` writes them: ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (r, in) and ``<module>.lora_B.weight`` (out, r), and
``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``, ``rank_pattern``,
``alpha_pattern``, ...). Modules carry the names of the layout's model: diffusers ``LuminaNextDiT2DModel`` for a
Next-DiT (``layers.3.attn1.to_q``), the original Lumina-T2X model for a Flag-DiT (``layers.3.attention.wq``).

The rename rows derive from the family's weight rules (``weights/nextdit.py``), so the engine's guarantees hold: every
key consumed once, nothing missing, shapes checked from the header, and diffusers' two copies of Next-DiT's query
(``attn1.to_q``, ``attn2.to_q``) become one adapter on ``wq`` when they are equal. An adapter that changes the two
differently (any made by peft on the diffusers model: its A matrices are drawn apart) loads into a model whose
cross-attention gets its own query (``models.lora.untie_query``).
"""

import collections
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from mindspore import Tensor

from ..atomic import read_json, staged_folder, write_json
from ..models import lora
from ..models.nextdit import NextDiT
from .checkpoints import open_file
from .flagdit import FLAGDIT
from .nextdit import NEXTDIT
from .rules import RuleTable, convert_tensors, copies_agree, export_tensors, plan_rename
from .safetensors import write_safetensors
from .tensors import TensorSpec

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PREFIXES = ("base_model.model.", "transformer.")  # peft's save_pretrained; diffusers' LoRA state dicts
VOCABULARY_KEY = "mindone_lumina.vocabulary"  # safetensors metadata: the words of the captions it was trained on
_LAYER = "layers.{i}."
_MODULES = {n for group in lora.TARGETS.values() for n in group}


def lora_table(table: RuleTable | None, name: str) -> RuleTable:
    """The adapter rows of a weight rule table: ``<module>.lora_A`` <- ``<source module>.lora_A.weight`` for every
    block linear a LoRA may target (``None``: the project's names)."""
    if table is None:
        pairs = [(f"{_LAYER}{m}.weight", (f"{_LAYER}{m}.weight",)) for m in sorted(_MODULES)]
    else:
        pairs = [(p, s) for p, s in table.rules if p.startswith(_LAYER) and p[len(_LAYER) : -7] in _MODULES]
    rows = [
        (f"{project[:-7]}.lora_{x}", tuple(f"{s[:-7]}.lora_{x}.weight" for s in sources))
        for project, sources in pairs
        for x in "AB"
    ]
    return RuleTable(name, tuple(rows))


@dataclass(frozen=True)
class AdapterLayout:
    name: str
    tied: RuleTable
    untied: RuleTable | None  # for a layout storing Next-DiT's query twice


def layouts(model) -> tuple:
    """The adapter layouts of ``model``'s family, the one written first."""
    family = NEXTDIT if isinstance(model, NextDiT) else FLAGDIT
    found = [
        AdapterLayout(lay.name, lora_table(lay.table, f"lora-{lay.name}"),
                      lora_table(lay.untied, f"lora-{lay.name}-untied") if lay.untied else None)
        for lay in family.layouts
    ]  # fmt: skip
    return tuple(sorted(found, key=lambda lay: lay.untied is None))  # diffusers before original for Next-DiT


class _Unprefixed:
    """A checkpoint reader with peft's ``base_model.model.`` (or diffusers' ``transformer.``) prefix removed."""

    def __init__(self, reader):
        self.reader, self.path = reader, reader.path
        self.names = {}
        for key in reader.keys():
            short = next((key[len(p) :] for p in PREFIXES if key.startswith(p)), key)
            if short in self.names:
                raise ValueError(f"{reader.path}: {key} and {self.names[short]} name the same tensor")
            self.names[short] = key

    def keys(self):
        return list(self.names)

    def shape(self, key):
        return self.reader.shape(self.names[key])

    def dtype(self, key):
        return self.reader.dtype(self.names[key])

    def read(self, key):
        return self.reader.read(self.names[key])


def _files(path: str) -> tuple:
    """(weights file, config file) of an adapter folder (or of its weights file)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    weights = path if not os.path.isdir(path) else os.path.join(folder, WEIGHTS)
    legacy = os.path.join(folder, "adapter_model.bin")  # peft before safetensors: a torch pickle
    if os.path.isdir(path) and not os.path.isfile(weights) and os.path.isfile(legacy):
        weights = legacy
    config = os.path.join(folder, CONFIG)
    for f, what in ((weights, "adapter weights"), (config, "adapter config")):
        if not os.path.isfile(f):
            raise ValueError(f"LoRA {path}: no {what} {f} (a peft adapter folder holds {WEIGHTS} and {CONFIG})")
    return weights, config


def read_config(path: str) -> dict:
    """``adapter_config.json``, checked for what this loader implements (plain LoRA on linear layers)."""
    cfg = read_json(path)
    unsupported = {
        "peft_type": (cfg.get("peft_type", "LORA") != "LORA", "only LORA adapters"),
        "use_dora": (bool(cfg.get("use_dora")), "DoRA is not implemented"),
        "bias": (cfg.get("bias", "none") != "none", "trained biases are not implemented"),
        "lora_bias": (bool(cfg.get("lora_bias")), "lora_B biases are not implemented"),
        "modules_to_save": (bool(cfg.get("modules_to_save")), "fully trained modules are not implemented"),
        "fan_in_fan_out": (bool(cfg.get("fan_in_fan_out")), "Conv1D-style (in, out) weights are not expected"),
    }
    for key, (bad, why) in unsupported.items():
        if bad:
            raise ValueError(f"{path}: {key}={cfg.get(key)!r} is not supported ({why})")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise ValueError(f"{path}: {key} must be a positive number, got {cfg.get(key)!r}")
    return cfg


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank/alpha pattern lookup: a key matches a module name it ends (regex, at a dot boundary)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class AdapterPlan:
    """An adapter file checked against a model: ranks and scales per layer path, project-named tensor specs."""

    path: str
    ranks: dict
    scales: dict
    specs: list
    untied: bool  # the query adapters differ between self- and cross-attention: needs ``untie_query``
    vocabulary: tuple | None


def check_folder(path: str) -> dict:
    """The config of the adapter folder ``path`` once its files are found and its config is one this loader reads
    (before any model is loaded; ``plan_adapter`` checks names and shapes against a model)."""
    return read_config(_files(path)[1])


def folders_and_scales(paths, scales, flag: str) -> list:
    """[(folder, scale), ...] from a command line's repeated ``flag`` and ``--lora-scale`` values (one scale for all
    or one each; default 1), every folder checked (``check_folder``)."""
    paths, scales = list(paths or []), list(scales or [])
    if scales and not paths:
        raise ValueError(f"--lora-scale given without {flag}")
    if len(scales) not in (0, 1, len(paths)):
        raise ValueError(f"--lora-scale: give one scale for all or one per {flag} ({len(paths)}), got {len(scales)}")
    scales = scales * len(paths) if len(scales) == 1 else scales or [1.0] * len(paths)
    for path in paths:
        if not os.path.isdir(path):
            raise ValueError(f"{flag} {path} " + ("is a file; expected a folder" if os.path.exists(path) else
                                                  "does not exist"))  # fmt: skip
        check_folder(path)
    return list(zip(paths, scales))


def plan_adapter(model, path: str, scale: float = 1.0) -> AdapterPlan:
    """Read and check an adapter folder (names and headers only; tensors are read when fetched)."""
    weights, config_path = _files(path)
    cfg = read_config(config_path)
    reader = _Unprefixed(open_file(weights))
    layout = min(layouts(model), key=lambda lay: len(plan_rename(reader.keys(), lay.tied)[2]))
    untied = layout.untied is not None and _needs_untied(reader, layout.tied)
    table = layout.untied if untied else layout.tied
    targets, _, unexpected = plan_rename(reader.keys(), table)
    if unexpected:
        raise ValueError(f"LoRA {path}: keys that are no adapter of a {layout.name}-layout {type(model).__name__} "
                         f"block linear layer: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")  # fmt: skip
    cells = dict(model.cells_and_names())
    source = {project: src for src, project in targets.items()}
    ranks, scales, expected = {}, {}, {}
    for module in sorted({key.rsplit(".", 1)[0] for key in source}):
        a_key, b_key = f"{module}.lora_A", f"{module}.lora_B"
        file_key = source.get(a_key) or source[b_key]
        dense = cells.get(module) or (cells.get(lora.untied_source(module)) if untied else None)
        if dense is None or not hasattr(dense, "weight"):
            raise ValueError(f"LoRA {path}: {file_key} adapts {module}, which this model does not have")
        out_dim, in_dim = dense.weight.shape
        rank = int(reader.shape(source[a_key])[0]) if a_key in source else int(cfg["r"])  # else: named missing
        ranks[module] = rank
        expected[a_key], expected[b_key] = (rank, in_dim), (out_dim, rank)
        alpha = _pattern_value(cfg.get("alpha_pattern"), file_key.rsplit(".lora_", 1)[0], cfg["lora_alpha"])
        scales[module] = scale * lora.scaling(alpha, rank, bool(cfg.get("use_rslora")))
    specs = convert_tensors(reader, table, expected, dtype="fp32", what=f"LoRA {path}")
    vocabulary = _metadata_vocabulary(reader.reader)
    return AdapterPlan(path, ranks, scales, specs, untied, vocabulary)


def _needs_untied(reader, tied: RuleTable) -> bool:
    """Whether the layout's two copies of a tensor are absent on one side or hold different values."""
    present = set(reader.keys())
    targets = {tied.target_of(key) for key in present} - {None}
    one_sided = any(not set(tied.sources_of(project)) <= present for project in targets)
    return one_sided or not copies_agree(reader, tied)


def _metadata_vocabulary(reader):
    raw = getattr(reader, "metadata", {}) or {}
    return tuple(json.loads(raw[VOCABULARY_KEY])) if VOCABULARY_KEY in raw else None


def apply_adapter(model, path: str, scale: float = 1.0, name: str | None = None) -> AdapterPlan:
    """Load the adapter at ``path`` onto ``model`` (frozen; for inference) with ``scale`` times its own scaling."""
    plan = plan_adapter(model, path, scale)
    taken = lora.adapter_names(model)
    name = name or os.path.basename(os.path.normpath(path)) or "adapter"
    name = name if name not in taken else f"{name}-{len(taken)}"
    if plan.untied:
        lora.untie_query(model)
    lora.attach(model, name, plan.ranks, plan.scales)
    params = lora.adapter_state(model, name)
    for spec in plan.specs:
        params[spec.name].set_data(Tensor(spec.fetch()).astype(params[spec.name].dtype))
    for p in params.values():
        p.requires_grad = False
    return plan


def save_adapter(model, folder: str, name: str = "default", arrays: dict | None = None, vocabulary=None,
                 force: bool = False) -> None:  # fmt: skip
    """Write adapter ``name`` of ``model`` (or ``arrays``: the same keys, e.g. its EMA) as a peft folder, in the
    family's first layout (diffusers names for Next-DiT). ``folder`` must be absent or empty unless ``force``."""
    state = lora.adapter_state(model, name)
    if not state:
        raise ValueError(f"the model has no adapter named {name!r}")
    values = {k: np.asarray(arrays[k] if arrays is not None else v.asnumpy(), np.float32) for k, v in state.items()}
    layout = layouts(model)[0]
    untied = bool(getattr(model.cfg, "separate_cross_query", False)) or any(".wq_y." in k for k in values)
    table = layout.untied if untied and layout.untied is not None else layout.tied
    specs = [TensorSpec(k, v.shape, "float32", (lambda v=v: v)) for k, v in sorted(values.items())]
    written = [TensorSpec(PREFIXES[0] + s.name, s.shape, s.dtype, s.fetch) for s in export_tensors(specs, table)]
    scales = lora.adapter_scales(model, name)
    modules = {}  # written module -> (rank, alpha); alpha = scale * r (an rsLoRA scale is written as a plain alpha)
    for key, value in values.items():
        if key.endswith(".lora_A"):
            for src in table.sources_of(key):
                modules[src[: -len(".lora_A.weight")]] = (value.shape[0], scales[key[:-7]] * value.shape[0])
    meta = {"format": "pt"} | ({VOCABULARY_KEY: json.dumps(sorted(vocabulary))} if vocabulary is not None else {})
    with staged_folder(folder, replace=force) as tmp:
        write_safetensors(os.path.join(tmp, WEIGHTS), written, meta)
        write_json(os.path.join(tmp, CONFIG), peft_config(modules))


def peft_config(modules: dict) -> dict:
    """peft's LoraConfig fields for ``modules`` (name -> (rank, alpha)): the most common rank and alpha, patterns
    for the others, ``target_modules`` the block-relative names (peft matches them as name suffixes)."""
    r = collections.Counter(rank for rank, _ in modules.values()).most_common(1)[0][0]
    alpha = collections.Counter(a for _, a in modules.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA", "task_type": None, "auto_mapping": None, "base_model_name_or_path": None,
        "revision": None, "inference_mode": True, "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted({re.sub(r"^layers\.\d+\.", "", m) for m in modules}),
        "rank_pattern": {m: rank for m, (rank, _) in modules.items() if rank != r},
        "alpha_pattern": {m: a for m, (_, a) in modules.items() if a != alpha},
        "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "lora_bias": False,
        "exclude_modules": None,
    }  # fmt: skip
