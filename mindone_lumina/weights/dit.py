"""How a DiT family's checkpoints are named, sharded and recorded, and the one way they are read, loaded and written.

``DiTWeights`` is declarative: a family (``nextdit.NEXTDIT``, ``flagdit.FLAGDIT``) gives its config and model
classes, presets, the original ``model_args.pth`` model names, the fairscale shard table and its layouts (rule tables
told apart by a key only that layout holds). Everything else is here and works for both: reading original
``consolidated[_ema].NN-of-MM`` files (model-parallel ranks merged), the project's own safetensors (config in the
metadata), diffusers weights (names by table; the folder's ``config.json`` is read by ``io.diffusers_io``); streaming
into a model; exporting to a layout.
"""

import dataclasses
import json
import os
from dataclasses import dataclass

from ..atomic import refuse_existing, write_json
from .checkpoints import ModelParallelCheckpoint, open_checkpoint
from .load import empty, load_specs, param_shapes
from .rules import RuleTable, ShardTable, convert_tensors, copies_agree, export_tensors
from .safetensors import SafetensorsFile, write_safetensors
from .torch_pickle import read_pickle

_WB = ("weight", "bias")


def fairscale_rows(block_norms: tuple, replicated: tuple) -> tuple:
    """How Lumina-T2X's fairscale layers shard a DiT over model-parallel ranks (``lumina_next_t2i/models/model.py``
    and ``lumina_t2i/models/model.py`` at 1c60696): ColumnParallelLinear splits weight and bias along dim 0,
    RowParallelLinear splits the weight along dim 1 and keeps the bias whole; plain norms and the learned tokens are
    replicated. ``gate`` and the qk LayerNorms are built per rank over n_heads / world heads: concatenating gates is
    exact, but a per-rank LayerNorm normalised over its own heads only, so the merged one is another function."""
    return (
        *((name, None, True) for name in replicated),
        *((f"x_embedder.{p}", 0, True) for p in _WB),
        *((f"t_embedder.mlp.0.{p}", 0, True) for p in _WB),
        ("t_embedder.mlp.2.weight", 1, True),
        ("t_embedder.mlp.2.bias", None, True),
        *((f"cap_embedder.0.{p}", None, True) for p in _WB),
        *((f"cap_embedder.1.{p}", 0, True) for p in _WB),
        *((f"layers.{{i}}.attention.{w}.weight", 0, True) for w in ("wq", "wk", "wv", "wk_y", "wv_y")),
        ("layers.{i}.attention.wo.weight", 1, True),
        ("layers.{i}.attention.gate", 0, True),
        *((f"layers.{{i}}.attention.{n}.{p}", 0, False) for n in ("q_norm", "k_norm", "ky_norm") for p in _WB),
        ("layers.{i}.feed_forward.w1.weight", 0, True),
        ("layers.{i}.feed_forward.w2.weight", 1, True),
        ("layers.{i}.feed_forward.w3.weight", 0, True),
        *((f"layers.{{i}}.{n}.weight", None, True) for n in (*block_norms, "attention_y_norm")),
        *((f"layers.{{i}}.adaLN_modulation.1.{p}", 0, True) for p in _WB),
        *((f"final_layer.{m}.{p}", 0, True) for m in ("linear", "adaLN_modulation.1") for p in _WB),
    )


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout: its rule table (None: the original names), a key that only it holds, and for a layout
    that stores a tensor twice the table to use when the copies differ (plus the config field that then holds)."""

    name: str
    table: RuleTable | None
    marker: str
    untied: RuleTable | None = None
    untied_field: str = ""


@dataclass(frozen=True)
class DiTWeights:
    name: str
    config: type
    model: type
    presets: dict
    model_names: dict  # original model_args.pth "model" -> preset
    shards: ShardTable
    layouts: tuple  # of Layout; the first is the original layout

    # --------------------------------------------------------------------------------------------------------------
    def is_family(self, path: str, ema: bool = False) -> bool:
        """Whether ``path`` is a checkpoint of this family in one of its layouts (key names only)."""
        try:
            keys = set(open_checkpoint(path, ema=ema, split_dim=self.shards.split_dim).keys())
        except ValueError:
            return False
        return any(layout.marker in keys for layout in self.layouts)

    def open(self, path: str, ema: bool = False, allow_inexact_merge: bool = False):
        """(reader, layout) of a checkpoint of this family; ``ValueError`` naming what is wrong."""
        reader = open_checkpoint(path, ema=ema, split_dim=self.shards.split_dim)
        if isinstance(reader, ModelParallelCheckpoint) and not allow_inexact_merge:
            inexact = self.shards.inexact(reader.keys())
            if inexact:
                raise ValueError(
                    f"{path}: {len(reader.ranks)} model-parallel ranks with per-rank qk LayerNorms ({inexact[0]}, "
                    "...): each rank normalised over its own heads only, so the merged single-device model computes "
                    "something else; pass allow_inexact_merge=True (--allow-inexact-merge) to merge anyway"
                )
        keys = set(reader.keys())
        for layout in self.layouts:
            if layout.marker in keys:
                return reader, layout
        raise ValueError(f"{path}: not a {self.name} checkpoint in a known layout (first keys: {sorted(keys)[:5]})")

    def recorded_config(self, path: str):
        """The architecture recorded with a checkpoint, or None: the project's safetensors metadata, the project's
        ``model_args.json``, or the original ``model_args.pth`` (a pickled Namespace naming the model)."""
        key = f"{self.model.__name__.lower()}_config"
        if path.endswith(".safetensors") and os.path.isfile(path):
            recorded = SafetensorsFile(path).metadata.get(key)
            if recorded:
                return self.config.from_dict(json.loads(recorded))
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        if os.path.isfile(os.path.join(folder, "model_args.json")):
            return self.config.resolve(os.path.join(folder, "model_args.json"), self.presets)
        if os.path.isfile(os.path.join(folder, "model_args.pth")):
            args = vars(read_pickle(os.path.join(folder, "model_args.pth")))
            if args.get("model") not in self.model_names:
                raise ValueError(f"{folder}/model_args.pth names model {args.get('model')!r}; known: "
                                 f"{sorted(self.model_names)}")  # fmt: skip
            preset = self.presets[self.model_names[args["model"]]]
            return dataclasses.replace(preset, qk_norm=bool(args.get("qk_norm")))
        return None

    def resolve_config(self, path: str, cfg=None):
        """The architecture ``cfg`` names (preset, JSON, dict or config), else the one recorded with ``path``."""
        cfg = self.config.resolve(cfg, self.presets) if cfg is not None else self.recorded_config(path)
        if cfg is None:
            raise ValueError(
                f"{path}: no config.json / model_args.* found; name the architecture (--arch PRESET_OR_JSON)"
            )
        return cfg

    def plan(self, path: str, cfg=None, ema=False, dtype="keep", allow_inexact_merge=False):
        """(config, ``TensorSpec``s with project names) of the checkpoint at ``path``, checked strictly against the
        config (``cfg``: preset, JSON, dict or config; else the recorded one). A layout storing a tensor twice whose
        copies differ (a diffusers-trained Next-DiT) gets its untied table, and the config its untied field."""
        reader, layout = self.open(path, ema, allow_inexact_merge)
        cfg = self.resolve_config(path, cfg)
        table = layout.table
        if layout.untied is not None and (getattr(cfg, layout.untied_field) or not copies_agree(reader, table)):
            table, cfg = layout.untied, dataclasses.replace(cfg, **{layout.untied_field: True})
        return cfg, convert_tensors(reader, table, param_shapes(empty(self.model, cfg)), dtype, what=path)

    def load(self, path: str, cfg=None, dtype=None, ema=False, allow_inexact_merge=False):
        """A model with the weights at ``path``, streamed one tensor at a time (peak: the model plus one tensor),
        stored in ``dtype`` (default: float32)."""
        import mindspore as ms

        cfg, specs = self.plan(path, cfg, ema, allow_inexact_merge=allow_inexact_merge)
        return load_specs(empty(self.model, cfg), specs, what=path, dtype=dtype or ms.float32)

    def layout(self, name: str) -> Layout:
        for layout in self.layouts:
            if layout.name == name:
                return layout
        raise ValueError(f"{self.name} has no {name!r} layout; it has {[lay.name for lay in self.layouts]}")

    def export(self, specs: list, cfg, layout: str) -> list:
        """Project-named specs renamed for ``layout`` (keys it stores twice written from one read)."""
        lay = self.layout(layout)
        untied = any(other.untied_field and getattr(cfg, other.untied_field) for other in self.layouts)
        if untied and lay.untied is None:
            raise ValueError(
                f"the {layout} layout of {self.name} has one query projection; this model has separate self- and "
                "cross-attention queries (trained in diffusers): export it as diffusers"
            )
        return export_tensors(specs, lay.untied if untied else lay.table)

    def write(self, specs: list, cfg, out: str, force: bool = False, progress=None) -> str:
        """The project's safetensors (``out`` ends with .safetensors; config in the metadata) or the original layout
        (``out`` a folder: consolidated.00-of-01.safetensors + model_args.json). Returns the weights path."""
        original = not out.endswith(".safetensors")
        path = os.path.join(out, "consolidated.00-of-01.safetensors") if original else out
        side = os.path.join(out, "model_args.json") if original else None
        for p in (path, side):
            if p:
                refuse_existing(p, force)
        metadata = {"format": "pt" if original else "ms", f"{self.model.__name__.lower()}_config":
                    json.dumps(dataclasses.asdict(cfg))}  # fmt: skip
        written = self.export(specs, cfg, self.layouts[0].name) if original else specs
        write_safetensors(path, written, metadata, force, progress)
        if side:  # the original constructor's arguments only
            write_json(side, {k: v for k, v in dataclasses.asdict(cfg).items() if k != "separate_cross_query"}, force)
        return path
