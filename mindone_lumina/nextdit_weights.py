"""Next-DiT weights in every format a Lumina-Next user has: detect, convert, load, export.

Inputs: original Lumina-T2X ``consolidated[_ema].NN-of-MM.{safetensors,pth}`` (model-parallel ranks merged by
``FAIRSCALE_SHARDS``), the project's own safetensors (same names as the original), and diffusers
``LuminaNextDiT2DModel`` folders (``transformer/``, single or sharded, fp32 or bf16). Outputs: the project's
safetensors (MindSpore-loadable), the original layout and the diffusers layout. File access is in ``checkpoint_io``,
the rename machinery in ``convert``.
"""

import dataclasses
import json
import os

from mindspore.nn.utils import no_init_parameters

from . import checkpoint_io, nextdit
from .convert import ShardTable, convert_tensors, export_tensors
from .nextdit import DIFFUSERS_RULES, NextDiTConfig

# How Lumina-T2X's fairscale layers shard each tensor over model-parallel ranks (lumina_next_t2i/models/model.py at
# 1c60696): ColumnParallelLinear splits weight and bias along dim 0, RowParallelLinear splits the weight along dim 1
# and keeps the bias whole; plain norms and pad_token are replicated. ``gate`` and the qk LayerNorms are built per
# rank over n_heads / world heads: concatenating gates is exact, but a per-rank LayerNorm normalised over its own
# slice of heads, so the merged (all-heads) LayerNorm is not the same function (``exact`` False).
_WB = ("weight", "bias")
FAIRSCALE_SHARDS = ShardTable(
    "nextdit-fairscale",
    (
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
        *(
            (f"layers.{{i}}.{n}.weight", None, True)
            for n in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2", "attention_y_norm")
        ),
        *((f"layers.{{i}}.adaLN_modulation.1.{p}", 0, True) for p in _WB),
        *((f"final_layer.linear.{p}", 0, True) for p in _WB),
        *((f"final_layer.adaLN_modulation.1.{p}", 0, True) for p in _WB),
    ),
)

# original model_args.pth "model" names -> presets (Lumina-Next-T2I / -SFT use the GQA model with --qk_norm)
MODEL_NAMES = {"NextDiT_2B_GQA_patch2": "nextdit-2b-gqa", "NextDiT_2B_patch2": "nextdit-2b"}


def param_shapes(cfg: NextDiTConfig) -> dict:
    """Parameter name -> shape of ``NextDiT(cfg)``, from the model definition without allocating its weights."""
    with no_init_parameters():
        model = nextdit.NextDiT(cfg)
    return {p.name: tuple(p.shape) for p in model.get_parameters()}


# ------------------------------------------------------------------------------------------------------------------
# diffusers config.json <-> NextDiTConfig (LuminaNextDiT2DModel.__init__ arguments, diffusers 0.35.2)
# ------------------------------------------------------------------------------------------------------------------
def diffusers_config(cfg: NextDiTConfig) -> dict:
    return {
        "_class_name": "LuminaNextDiT2DModel",
        "_diffusers_version": "0.35.2",
        "sample_size": 128,  # latent side of the 1024 px training resolution; used only by the pipeline
        "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels,
        "hidden_size": cfg.dim,
        "num_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_kv_heads": cfg.kv_heads,
        "multiple_of": cfg.multiple_of,
        "ffn_dim_multiplier": cfg.ffn_dim_multiplier,
        "norm_eps": cfg.norm_eps,
        "learn_sigma": cfg.learn_sigma,
        "qk_norm": cfg.qk_norm,
        "cross_attention_dim": cfg.cap_feat_dim,
        "scaling_factor": 1.0,
    }


def config_from_diffusers(conf: dict) -> NextDiTConfig:
    if conf.get("_class_name", "LuminaNextDiT2DModel") != "LuminaNextDiT2DModel":
        raise ValueError(f"expected a LuminaNextDiT2DModel config, got {conf.get('_class_name')}")
    return NextDiTConfig(
        patch_size=conf.get("patch_size", 2),
        in_channels=conf.get("in_channels", 4),
        dim=conf.get("hidden_size", 2304),
        n_layers=conf.get("num_layers", 32),
        n_heads=conf.get("num_attention_heads", 32),
        n_kv_heads=conf.get("num_kv_heads"),
        multiple_of=conf.get("multiple_of", 256),
        ffn_dim_multiplier=conf.get("ffn_dim_multiplier"),
        norm_eps=conf.get("norm_eps", 1e-5),
        learn_sigma=conf.get("learn_sigma", True),
        qk_norm=conf.get("qk_norm", True),
        cap_feat_dim=conf.get("cross_attention_dim", 2048),
    )


# ------------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------------
def weights_folder(path: str) -> str:
    """A diffusers pipeline folder is read through its ``transformer/`` subfolder."""
    sub = os.path.join(path, "transformer")
    return sub if os.path.isdir(path) and os.path.isdir(sub) else path


def detect_config(path: str) -> NextDiTConfig | None:
    """The architecture recorded with a checkpoint, or None: the project's safetensors metadata, a diffusers
    ``config.json``, the project's ``model_args.json``, or the original ``model_args.pth`` (a pickled Namespace)."""
    path = weights_folder(path)
    if path.endswith(".safetensors") and os.path.isfile(path):
        recorded = checkpoint_io.SafetensorsFile(path).metadata.get("nextdit_config")
        if recorded:
            return NextDiTConfig.from_dict(json.loads(recorded))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    conf = os.path.join(folder, "config.json")
    if os.path.isfile(conf):
        with open(conf) as f:
            return config_from_diffusers(json.load(f))
    if os.path.isfile(os.path.join(folder, "model_args.json")):
        return nextdit.resolve_config(os.path.join(folder, "model_args.json"))
    if os.path.isfile(os.path.join(folder, "model_args.pth")):
        args = vars(checkpoint_io.read_pickle(os.path.join(folder, "model_args.pth")))
        if args.get("model") not in MODEL_NAMES:
            raise ValueError(f"{folder}/model_args.pth names model {args.get('model')!r}; known: {sorted(MODEL_NAMES)}")
        return dataclasses.replace(nextdit.PRESETS[MODEL_NAMES[args["model"]]], qk_norm=bool(args.get("qk_norm")))
    return None


def open_nextdit(path: str, ema: bool = False, allow_inexact_merge: bool = False):
    """A reader over any supported Next-DiT checkpoint, plus its layout table (None: original/project names)."""
    reader = checkpoint_io.open_checkpoint(weights_folder(path), ema=ema, split_dim=FAIRSCALE_SHARDS.split_dim)
    if isinstance(reader, checkpoint_io.ModelParallelCheckpoint) and not allow_inexact_merge:
        inexact = FAIRSCALE_SHARDS.inexact(reader.keys())
        if inexact:
            raise ValueError(
                f"{path}: {len(reader.ranks)} model-parallel ranks with per-rank qk LayerNorms ({inexact[0]}, ...): "
                "each rank normalised over its own heads only, so the merged single-device model computes something "
                "else; pass allow_inexact_merge=True (--allow-inexact-merge) to merge anyway"
            )
    keys = set(reader.keys())
    if "x_embedder.weight" in keys:
        return reader, None
    if "patch_embedder.proj.weight" in keys:
        return reader, DIFFUSERS_RULES
    raise ValueError(f"{path}: not a Next-DiT checkpoint in a known layout (first keys: {sorted(keys)[:5]})")


def resolve(path: str, arch=None) -> NextDiTConfig:
    """``arch`` (preset, JSON path, dict, config) if given, else the architecture recorded with the checkpoint."""
    if arch is not None:
        return nextdit.resolve_config(arch)
    cfg = detect_config(path)
    if cfg is None:
        raise ValueError(f"{path}: no config.json / model_args.* found; name the architecture (--arch PRESET_OR_JSON)")
    return cfg


def nextdit_tensors(path: str, cfg: NextDiTConfig, ema=False, dtype="keep", strict=True, allow_inexact_merge=False):
    """Streaming plan (``TensorSpec``s with project names) for the checkpoint at ``path``, checked against ``cfg``."""
    reader, table = open_nextdit(path, ema, allow_inexact_merge)
    return convert_tensors(reader, table, param_shapes(cfg), dtype, strict, what=path)


def load_nextdit_state(path: str, cfg=None, ema: bool = False, allow_inexact_merge: bool = False) -> dict:
    """Project name -> numpy array for any supported checkpoint (layout detected, strict), ready for
    ``loading.load_state_dict(NextDiT(cfg), state)``. ``cfg`` as in ``resolve``; bfloat16 arrives as float32."""
    specs = nextdit_tensors(path, resolve(path, cfg), ema, allow_inexact_merge=allow_inexact_merge)
    return {s.name: s.fetch() for s in specs}


# ------------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------------
FORMATS = ("mindspore", "original", "diffusers")


def output_files(out: str, to: str) -> str:
    """The weights file written for ``out``: a file for mindspore, inside a folder for original and diffusers."""
    if to == "mindspore":
        if not out.endswith(".safetensors"):
            raise ValueError(f"output {out} for the mindspore format must be a .safetensors file path")
        return out
    if to == "original":
        return os.path.join(out, "consolidated.00-of-01.safetensors")
    if to == "diffusers":
        return os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors")
    raise ValueError(f"unknown output format {to!r}: expected one of {FORMATS}")


def layout_tensors(specs: list, to: str) -> list:
    """Project-named specs renamed for the ``to`` layout (diffusers stores ``wq`` and ``q_norm`` twice)."""
    if to not in FORMATS:
        raise ValueError(f"unknown output format {to!r}: expected one of {FORMATS}")
    return export_tensors(specs, DIFFUSERS_RULES if to == "diffusers" else None)


def _side_file(out: str, to: str) -> str | None:
    """The config written next to the weights: model_args.json (original) or config.json (diffusers)."""
    return {
        "original": os.path.join(out, "model_args.json"),
        "diffusers": os.path.join(out, "transformer", "config.json"),
    }.get(to)


def check_outputs(out: str, to: str, force: bool = False):
    """Refuse up front (``ValueError``) an output path of the wrong kind or one that exists without ``force``."""
    for path in (output_files(out, to), _side_file(out, to)):
        if path:
            checkpoint_io.check_writable(path, force)


def write_nextdit(written: list, cfg: NextDiTConfig, out: str, to: str = "mindspore", force=False, progress=None):
    """Write ``layout_tensors(specs, to)`` and the layout's config file; returns the weights path."""
    check_outputs(out, to, force)
    path, side = output_files(out, to), _side_file(out, to)
    metadata = {"format": "ms" if to == "mindspore" else "pt", "nextdit_config": json.dumps(dataclasses.asdict(cfg))}
    checkpoint_io.write_safetensors(path, written, metadata, force, progress)
    if side:
        checkpoint_io.write_json(side, dataclasses.asdict(cfg) if to == "original" else diffusers_config(cfg), force)
    return path
