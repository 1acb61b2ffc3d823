"""Flag-DiT (Lumina-T2I) weights: detect, convert, load, export. The Flag-DiT counterpart of ``nextdit_weights``.

Inputs: original Lumina-T2X ``consolidated[_ema].NN-of-MM.{safetensors,pth}`` (model-parallel ranks merged by
``FAIRSCALE_SHARDS``) and the project's own safetensors; both use the original names, so the rename is the identity
and the conversion is strict (every key consumed, every parameter filled, every shape checked). There is no diffusers
Flag-DiT. Outputs: the project's safetensors (MindSpore-loadable, config in its metadata) and the original layout.
"""

import dataclasses
import json
import os

import numpy as np

import mindspore as ms
from mindspore import Tensor
from mindspore.nn.utils import no_init_parameters

from . import backend, checkpoint_io, flagdit
from .convert import IDENTITY, ShardTable, convert_tensors
from .flagdit import FlagDiTConfig

# How lumina_t2i/models/model.py (1c60696) shards each tensor over fairscale model-parallel ranks: ColumnParallelLinear
# splits weight and bias along dim 0 (also with gather_output), RowParallelLinear splits the weight along dim 1 and
# keeps the bias whole; norms, eol_token and pad_token are replicated. ``gate`` and the qk LayerNorms are per-rank over
# n_heads / world heads: concatenating gates is exact, merged LayerNorms are another function (``exact`` False).
_WB = ("weight", "bias")
FAIRSCALE_SHARDS = ShardTable(
    "flagdit-fairscale",
    (
        ("eol_token", None, True),
        ("pad_token", None, True),
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
        *((f"layers.{{i}}.{n}.weight", None, True) for n in ("attention_norm", "ffn_norm", "attention_y_norm")),
        *((f"layers.{{i}}.adaLN_modulation.1.{p}", 0, True) for p in _WB),
        *((f"final_layer.linear.{p}", 0, True) for p in _WB),
        *((f"final_layer.adaLN_modulation.1.{p}", 0, True) for p in _WB),
    ),
)

# original model_args.pth "model" names -> presets (Lumina-T2I is DiT_Llama_5B_patch2 with --qk_norm, LLaMA-2-7B)
MODEL_NAMES = {"DiT_Llama_5B_patch2": "flagdit-5b"}
FORMATS = ("mindspore", "original")


def param_shapes(cfg: FlagDiTConfig) -> dict:
    """Parameter name -> shape of ``FlagDiT(cfg)``, from the model definition without allocating its weights."""
    with no_init_parameters():
        model = flagdit.FlagDiT(cfg)
    return {p.name: tuple(p.shape) for p in model.get_parameters()}


# ------------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------------
def open_flagdit(path: str, ema: bool = False, allow_inexact_merge: bool = False):
    """A reader over a Flag-DiT checkpoint (file, folder or model-parallel ranks), keys in the original names."""
    reader = checkpoint_io.open_checkpoint(path, ema=ema, split_dim=FAIRSCALE_SHARDS.split_dim)
    if "eol_token" not in set(reader.keys()):
        raise ValueError(f"{path}: not a Flag-DiT checkpoint (no eol_token; first keys: {sorted(reader.keys())[:5]})")
    if isinstance(reader, checkpoint_io.ModelParallelCheckpoint) and not allow_inexact_merge:
        inexact = FAIRSCALE_SHARDS.inexact(reader.keys())
        if inexact:
            raise ValueError(
                f"{path}: {len(reader.ranks)} model-parallel ranks with per-rank qk LayerNorms ({inexact[0]}, ...): "
                "each rank normalised over its own heads only, so the merged single-device model computes something "
                "else; pass allow_inexact_merge=True (--allow-inexact-merge) to merge anyway"
            )
    return reader


def is_flagdit(path: str, ema: bool = False) -> bool:
    """Whether the checkpoint at ``path`` holds a Flag-DiT (its ``eol_token``), from key names only."""
    try:
        reader = checkpoint_io.open_checkpoint(path, ema=ema, split_dim=FAIRSCALE_SHARDS.split_dim)
    except ValueError:
        return False  # not a single checkpoint this reader understands (e.g. a diffusers pipeline folder)
    return "eol_token" in set(reader.keys())


def detect_config(path: str) -> FlagDiTConfig | None:
    """The architecture recorded with a checkpoint, or None: the project's safetensors metadata, the project's
    ``model_args.json``, or the original ``model_args.pth`` (a pickled Namespace naming the model)."""
    if path.endswith(".safetensors") and os.path.isfile(path):
        recorded = checkpoint_io.SafetensorsFile(path).metadata.get("flagdit_config")
        if recorded:
            return FlagDiTConfig.from_dict(json.loads(recorded))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isfile(os.path.join(folder, "model_args.json")):
        return flagdit.resolve_config(os.path.join(folder, "model_args.json"))
    if os.path.isfile(os.path.join(folder, "model_args.pth")):
        args = vars(checkpoint_io.read_pickle(os.path.join(folder, "model_args.pth")))
        if args.get("model") not in MODEL_NAMES:
            raise ValueError(f"{folder}/model_args.pth names model {args.get('model')!r}; known: {sorted(MODEL_NAMES)}")
        return dataclasses.replace(flagdit.PRESETS[MODEL_NAMES[args["model"]]], qk_norm=bool(args.get("qk_norm")))
    return None


def resolve(path: str, arch=None) -> FlagDiTConfig:
    """``arch`` (preset, JSON path, dict, config) if given, else the architecture recorded with the checkpoint."""
    if arch is not None:
        return flagdit.resolve_config(arch)
    cfg = detect_config(path)
    if cfg is None:
        raise ValueError(f"{path}: no model_args.* found; name the architecture (--arch PRESET_OR_JSON)")
    return cfg


def flagdit_tensors(path: str, cfg: FlagDiTConfig, ema=False, dtype="keep", strict=True, allow_inexact_merge=False):
    """Streaming plan (``TensorSpec``s with project names) for the checkpoint at ``path``, checked against ``cfg``."""
    reader = open_flagdit(path, ema, allow_inexact_merge)
    return convert_tensors(reader, IDENTITY, param_shapes(cfg), dtype, strict, what=path)


def load_flagdit_state(path: str, cfg=None, ema: bool = False, allow_inexact_merge: bool = False) -> dict:
    """Project name -> numpy array for a Flag-DiT checkpoint (strict), ready for
    ``loading.load_state_dict(FlagDiT(cfg), state)``. ``cfg`` as in ``resolve``; bfloat16 arrives as float32."""
    specs = flagdit_tensors(path, resolve(path, cfg), ema, allow_inexact_merge=allow_inexact_merge)
    return {s.name: s.fetch() for s in specs}


# ------------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------------
def output_files(out: str, to: str) -> str:
    """The weights file written for ``out``: a .safetensors file for mindspore, inside a folder for original."""
    if to == "mindspore":
        if not out.endswith(".safetensors"):
            raise ValueError(f"output {out} for the mindspore format must be a .safetensors file path")
        return out
    if to == "original":
        return os.path.join(out, "consolidated.00-of-01.safetensors")
    raise ValueError(f"Flag-DiT converts to {FORMATS}, not {to!r} (there is no diffusers Flag-DiT)")


def check_outputs(out: str, to: str, force: bool = False):
    """Refuse up front (``ValueError``) an output path of the wrong kind or one that exists without ``force``."""
    checkpoint_io.check_writable(output_files(out, to), force)
    if to == "original":
        checkpoint_io.check_writable(os.path.join(out, "model_args.json"), force)


def write_flagdit(specs: list, cfg: FlagDiTConfig, out: str, to: str = "mindspore", force=False, progress=None):
    """Write the project-named ``specs`` (the original names) and, for the original layout, ``model_args.json``."""
    check_outputs(out, to, force)
    path = output_files(out, to)
    metadata = {"format": "ms" if to == "mindspore" else "pt", "flagdit_config": json.dumps(dataclasses.asdict(cfg))}
    checkpoint_io.write_safetensors(path, specs, metadata, force, progress)
    if to == "original":
        checkpoint_io.write_json(os.path.join(out, "model_args.json"), dataclasses.asdict(cfg), force)
    return path


def load_flagdit(path: str, dtype=ms.float32, arch=None, ema: bool = False) -> flagdit.FlagDiT:
    """A ``FlagDiT`` with the weights at ``path`` (strict), stored in ``dtype``: parameters are created empty and
    filled one tensor at a time, so peak memory is the model in ``dtype`` plus one tensor (the 5B model in fp16
    loads in about 10 GB, whatever the file's dtype)."""
    backend.check_dtype_supported(dtype)
    cfg = resolve(path, arch)
    with no_init_parameters():
        model = flagdit.FlagDiT(cfg)
    params = {p.name: p for p in model.get_parameters()}
    np_dtype = np.float16 if dtype == ms.float16 else np.float32
    for spec in flagdit_tensors(path, cfg, ema):  # strict: every parameter is filled exactly once
        p = params[spec.name]
        p.set_dtype(dtype)
        p.set_data(Tensor(spec.fetch().astype(np_dtype, copy=False), dtype=dtype))
    return model
