"""Components from any path a user has, streamed into their Cells in the requested dtype: a DiT (Next-DiT or
Flag-DiT from original checkpoints, the project's safetensors, or a diffusers ``transformer/`` folder), a prompt
encoder and its tokenizer (a transformers Gemma or LLaMA folder) and a VAE (a diffusers ``vae/`` folder).

Every loader checks names and shapes from the file headers before it allocates anything, and fills one parameter at
a time: peak memory is the model in its dtype plus one tensor.
"""

import os

import mindspore as ms

from . import backend
from .io.diffusers_io import WEIGHTS_NAME, component_config, transformer_config, vae_config, vae_folder
from .io.diffusers_io import text_encoder_config as read_text_encoder_config
from .models import lora
from .models.vae import AutoencoderKL
from .text import tokenizers
from .weights import lora as lora_files
from .weights.checkpoints import open_checkpoint
from .weights.decoder import load_decoder
from .weights.flagdit import FLAGDIT
from .weights.load import cell_specs, empty, load_specs, param_shapes
from .weights.nextdit import NEXTDIT
from .weights.rules import convert_tensors
from .weights.tensors import TensorSpec


def transformer_path(path: str) -> str:
    """A pipeline folder is read through its ``transformer/`` subfolder."""
    sub = os.path.join(path, "transformer")
    return sub if os.path.isdir(path) and os.path.isdir(sub) else path


def transformer_plan(path: str, arch=None, ema=False, dtype="keep", allow_inexact_merge=False):
    """(family ``weights.dit.DiTWeights``, config, ``TensorSpec``s) of any DiT checkpoint, the architecture being
    ``arch`` (preset, JSON, dict, config), else a diffusers folder's ``config.json``, else the one recorded with the
    weights. Nothing is read but headers (and, for diffusers, the twice-stored query, to compare its copies)."""
    path, family, arch = _family_and_arch(path, arch, ema)
    cfg, specs = family.plan(path, arch, ema, dtype, allow_inexact_merge)
    return family, cfg, specs


def _family_and_arch(path: str, arch=None, ema=False) -> tuple:
    """(weights path, family, architecture or None = the one recorded with the weights) of a DiT checkpoint."""
    path = transformer_path(path)
    family = FLAGDIT if FLAGDIT.is_family(path, ema) else NEXTDIT
    if arch is None and family is NEXTDIT and os.path.isfile(os.path.join(path, "config.json")):
        arch = component_config(path, transformer_config)
    return path, family, arch


def dit_config(path: str, arch=None, ema=False):
    """The config ``transformer_plan`` finds for the DiT at ``path``, from config files and weight headers only: no
    tensor is read (a command line checks sizes against it before loading anything)."""
    path, family, arch = _family_and_arch(path, arch, ema)
    if not os.path.exists(path):
        open_checkpoint(path)  # the reader's own "not found" error
    return family.resolve_config(path, arch)


def build_transformer(family, cfg, specs, dtype=ms.float32, what: str = "transformer"):
    backend.check_dtype_supported(dtype)
    return load_specs(empty(family.model, cfg), specs, what, dtype)


def merge_loras(family, cfg, specs, loras) -> tuple:
    """(config, specs, adapter words) of a transformer with LoRA adapters ``loras`` ((folder, scale), ...) merged
    into its weights: built in fp32, merged once, each tensor written in its source dtype (a cross-attention query
    that an adapter untied takes the query's). Peak memory: the model in fp32 plus the adapters."""
    model = build_transformer(family, cfg, specs, ms.float32)
    words = set()
    for path, scale in loras:
        words |= set(lora_files.apply_adapter(model, path, scale).vocabulary or ())
    lora.merge(model)
    dtypes = {s.name: s.dtype for s in specs}
    for name in [n for n in param_shapes(model) if n not in dtypes]:  # wq_y, qy_norm: as the query they copy
        dtypes[name] = dtypes[lora.untied_source(name)]
    merged = [TensorSpec(s.name, s.shape, dtypes[s.name], s.fetch) for s in cell_specs(model)]
    return model.cfg, merged, words


def empty_transformer(cfg):
    """A Next-DiT or Flag-DiT of ``cfg`` with no parameter memory (for checks of names and shapes)."""
    return empty((NEXTDIT if isinstance(cfg, NEXTDIT.config) else FLAGDIT).model, cfg)


def check_loras(loras, transformer_cfg) -> None:
    """Each LoRA folder ((folder, scale), ...) fits the transformer ``transformer_cfg`` describes: file names and
    headers checked against an unallocated model, so a wrong adapter fails before anything is loaded."""
    model = empty_transformer(transformer_cfg)
    for path, scale in loras:
        lora_files.plan_adapter(model, path, scale)


def load_transformer(path: str, dtype=ms.float32, arch=None, ema: bool = False):
    """A ``NextDiT`` or ``FlagDiT`` (told apart by Flag-DiT's ``eol_token``) with the weights at ``path``."""
    backend.check_dtype_supported(dtype)
    return build_transformer(*transformer_plan(path, arch, ema), dtype, path)


def text_encoder_config(folder: str):
    return component_config(folder, read_text_encoder_config)


def load_text_encoder(folder: str, dtype=ms.float32, cfg=None):
    """A ``DecoderEncoder`` (Gemma or LLaMA, by the folder's ``model_type``) with the folder's weights."""
    backend.check_dtype_supported(dtype)
    return load_decoder(folder, cfg or text_encoder_config(folder), dtype)


def load_tokenizer(folder: str, cfg):
    """The tokenizer of the encoder ``cfg`` belongs to (Gemma or LLaMA conventions), from ``folder``."""
    return tokenizers.load_tokenizer(folder, cfg.MODEL_TYPE)


def load_vae(path: str, dtype=ms.float32, into: AutoencoderKL | None = None) -> AutoencoderKL:
    """An ``AutoencoderKL`` from a diffusers ``vae/`` folder (or a pipeline folder holding one), strictly; ``into``:
    fill this model instead of a new one (a training run's starting weights; every shape must match)."""
    backend.check_dtype_supported(dtype)
    folder = vae_folder(path)
    weights = os.path.join(folder, WEIGHTS_NAME)
    vae = into if into is not None else empty(AutoencoderKL, component_config(folder, vae_config))
    reader = open_checkpoint(weights if os.path.isfile(weights) else folder)  # else: one weights file or an index
    return load_specs(vae, convert_tensors(reader, None, param_shapes(vae), what=folder), folder, dtype)


def weight_bytes(path: str) -> int:
    """Bytes of the weight files under ``path`` (a file or a folder), to decide what to keep in memory."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs
               if f.endswith((".safetensors", ".pth", ".pt", ".bin")))  # fmt: skip
