"""The one reader and writer of the diffusers / transformers folder layouts.

A pipeline folder is what ``diffusers.LuminaPipeline.from_pretrained`` loads: ``model_index.json``, ``transformer/``
(``LuminaNextDiT2DModel``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` with diffusers names),
``text_encoder/`` (transformers ``GemmaModel``), ``tokenizer/``, ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``
with the shift of the project's default schedule) and ``vae/`` (``AutoencoderKL``). What only the project reads sits
in one extra file that diffusers ignores, ``mindone_lumina.json``:

    {"train_size": 1024,                   # pixels per side of the training area (RoPE extrapolation reference)
     "prompt_template": "{}",              # applied to every prompt before tokenizing ("{}" = as typed)
     "sampling": {"solver": "midpoint", "num_steps": 30, "schedule": "shift", "shift": 4.0, "guidance_scale": 4.0},
     "vocabulary": ["a", "background", ...]}  # optional: the words of the training captions (warns on others)

A pixel-space model (trained without a VAE) has no diffusers pipeline (``LuminaPipeline`` needs a VAE): its folder
holds the same components and ``mindone_lumina.json`` but no ``model_index.json``. Folders written by mindone-lumina
0.1 (``transformer/model.safetensors`` with the original parameter names, ``train_size`` in ``model_index.json``, no
scheduler) are still read; ``PipelineFolder.layout`` says which was found.
"""

import dataclasses
import os
import shutil
from dataclasses import dataclass, field

from ..atomic import read_json, refuse_existing, staged_folder, write_json
from ..models.nextdit import NextDiTConfig
from ..models.vae import VAEConfig
from ..sampling import SampleSettings
from ..text.decoder import DecoderConfig
from ..text.gemma import GemmaConfig
from ..text.llama import LlamaConfig
from ..weights.load import cell_specs
from ..weights.nextdit import NEXTDIT
from ..weights.safetensors import write_safetensors

DIFFUSERS_VERSION = "0.35.2"  # the version whose loaders the written folders are tested against
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PROJECT_FILE = "mindone_lumina.json"
DIFFUSERS, PROJECT_V0 = "diffusers", "mindone-lumina 0.1"
LAYOUTS = {
    DIFFUSERS: "the diffusers layout",
    PROJECT_V0: "the mindone-lumina 0.1 layout (transformer/model.safetensors with the original parameter names; "
    "rewrite it with `tools/convert.py OLD NEW --to diffusers` so that diffusers can load it)",
}


# ------------------------------------------------------------------------------------------------------------------
# Component configs (config.json) <-> the project's config classes
# ------------------------------------------------------------------------------------------------------------------
def transformer_config_json(cfg: NextDiTConfig, sample_size: int) -> dict:
    """``LuminaNextDiT2DModel`` arguments; ``sample_size`` is the latent side of the training area."""
    return {"_class_name": "LuminaNextDiT2DModel", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": sample_size,
            "patch_size": cfg.patch_size, "in_channels": cfg.in_channels, "hidden_size": cfg.dim,
            "num_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_kv_heads": cfg.kv_heads,
            "multiple_of": cfg.multiple_of, "ffn_dim_multiplier": cfg.ffn_dim_multiplier, "norm_eps": cfg.norm_eps,
            "learn_sigma": cfg.learn_sigma, "qk_norm": cfg.qk_norm, "cross_attention_dim": cfg.cap_feat_dim,
            "scaling_factor": 1.0}  # fmt: skip


def transformer_config(conf: dict) -> NextDiTConfig:
    """A ``LuminaNextDiT2DModel`` config.json as a ``NextDiTConfig`` (diffusers' defaults for absent fields)."""
    if conf.get("_class_name", "LuminaNextDiT2DModel") != "LuminaNextDiT2DModel":
        raise ValueError(f"expected a LuminaNextDiT2DModel config, got {conf.get('_class_name')}")
    return NextDiTConfig(
        patch_size=conf.get("patch_size", 2), in_channels=conf.get("in_channels", 4), dim=conf.get("hidden_size", 2304),
        n_layers=conf.get("num_layers", 32), n_heads=conf.get("num_attention_heads", 32),
        n_kv_heads=conf.get("num_kv_heads"), multiple_of=conf.get("multiple_of", 256),
        ffn_dim_multiplier=conf.get("ffn_dim_multiplier"), norm_eps=conf.get("norm_eps", 1e-5),
        learn_sigma=conf.get("learn_sigma", True), qk_norm=conf.get("qk_norm", True),
        cap_feat_dim=conf.get("cross_attention_dim", 2048),
    )  # fmt: skip


def vae_config_json(cfg: VAEConfig) -> dict:
    levels = len(cfg.block_out_channels)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **dataclasses.asdict(cfg),
            "block_out_channels": list(cfg.block_out_channels), "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels, "act_fn": "silu"}  # fmt: skip


def vae_config(conf: dict) -> VAEConfig:
    """An ``AutoencoderKL`` config.json as a ``VAEConfig``; settings this port does not implement are refused."""
    if conf.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"expected an AutoencoderKL config, got _class_name {conf['_class_name']!r}")
    levels = len(conf.get("block_out_channels", (64,)))
    supported = {"act_fn": "silu", "down_block_types": ["DownEncoderBlock2D"] * levels,
                 "up_block_types": ["UpDecoderBlock2D"] * levels}  # fmt: skip
    for key, value in supported.items():
        got = conf.get(key, value)
        if (list(got) if isinstance(value, list) else got) != value:
            raise ValueError(f"unsupported AutoencoderKL setting {key}={got!r}; expected {value!r}")
    # diffusers' own defaults for fields the file may omit; sample_size may be a (h, w) pair
    args = {"block_out_channels": (64,), "layers_per_block": 1, "scaling_factor": 0.18215, "sample_size": 32}
    args.update({k: v for k, v in conf.items() if k in {f.name for f in dataclasses.fields(VAEConfig)}})
    if isinstance(args["sample_size"], list | tuple):
        args["sample_size"] = int(args["sample_size"][0])
    return VAEConfig(**args)


def text_encoder_config(conf: dict) -> DecoderConfig:
    """A transformers Gemma or LLaMA config.json as the encoder's config (chosen by ``model_type``)."""
    families = {"gemma": GemmaConfig, "llama": LlamaConfig}
    if conf.get("model_type") not in families:
        raise ValueError(f"expected a Gemma-1 or LLaMA config, got model_type {conf.get('model_type')!r}")
    return families[conf["model_type"]].from_hf_config(conf)


def text_encoder_config_json(cfg: GemmaConfig) -> dict:
    """A transformers ``GemmaModel`` config.json (Lumina-Next's encoder; special ids as ``tokenizers`` trains)."""
    return {**dataclasses.asdict(cfg), "model_type": "gemma", "architectures": ["GemmaModel"],
            "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "pad_token_id": 0,
            "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True, "torch_dtype": "float32"}  # fmt: skip


def component_config(path: str, reader):
    """``reader(config.json of path)``, with the file named in any error."""
    file = os.path.join(path, "config.json")
    try:
        return reader(read_json(file))
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e


def vae_folder(path: str) -> str:
    """A diffusers ``vae/`` folder, or a pipeline folder holding one."""
    for folder in (path, os.path.join(path, "vae")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise ValueError(f"{path}: no config.json here or in {os.path.join(path, 'vae')}; expected a diffusers vae folder")


# ------------------------------------------------------------------------------------------------------------------
# Pipeline folders
# ------------------------------------------------------------------------------------------------------------------
DEFAULT_SAMPLING = {
    k: getattr(SampleSettings(), k) for k in ("solver", "num_steps", "schedule", "shift", "guidance_scale")
}


@dataclass(frozen=True)
class ProjectSettings:
    """The contents of ``mindone_lumina.json`` (module docstring); ``sampling`` holds ``SampleSettings`` fields (the
    demo's solver, steps, schedule, shift and guidance unless given)."""

    train_size: int
    prompt_template: str = "{}"
    sampling: dict = field(default_factory=dict)
    vocabulary: list | None = None  # the training captions' words, for a model that knows no others

    def __post_init__(self):
        unknown = sorted(set(self.sampling) - {f.name for f in dataclasses.fields(SampleSettings)})
        if unknown:
            raise ValueError(f"unknown sampling setting(s) {unknown}; expected SampleSettings fields")
        object.__setattr__(self, "sampling", {**DEFAULT_SAMPLING, **self.sampling})
        if not isinstance(self.train_size, int) or self.train_size < 1:
            raise ValueError(f"train_size must be a positive integer, got {self.train_size!r}")
        if self.prompt_template.count("{}") != 1:
            raise ValueError(f"prompt_template must hold exactly one {{}} for the prompt, got {self.prompt_template!r}")
        if self.vocabulary is not None and not all(isinstance(w, str) for w in self.vocabulary):
            raise ValueError(f"vocabulary must be a list of words, got {self.vocabulary!r}")


@dataclass(frozen=True)
class PipelineFolder:
    root: str
    layout: str  # DIFFUSERS or PROJECT_V0
    settings: ProjectSettings
    has_vae: bool

    def part(self, name: str) -> str:
        return os.path.join(self.root, name)

    def describe(self) -> str:
        return f"{self.root}: {LAYOUTS[self.layout]}"


def is_pipeline(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("model_index.json", PROJECT_FILE))


def read_pipeline(root: str) -> PipelineFolder:
    """What a pipeline folder holds and in which layout; ``ValueError`` naming a missing component."""
    index_file = os.path.join(root, "model_index.json")
    index = read_json(index_file) if os.path.isfile(index_file) else {"vae": None}  # a pixel-space model
    has_vae = index.get("vae") not in (None, [None, None])
    for part in ("transformer", "text_encoder", "tokenizer") + (("vae",) if has_vae else ()):
        if not os.path.isdir(os.path.join(root, part)):
            raise ValueError(f"{root} is missing the {part}/ component (model_index.json lists {sorted(index)})")
    transformer = os.path.join(root, "transformer")
    layout = PROJECT_V0 if os.path.isfile(os.path.join(transformer, "model.safetensors")) else DIFFUSERS
    conf = read_json(os.path.join(transformer, "config.json"))
    factor = 2 ** (len(component_config(vae_folder(root), vae_config).block_out_channels) - 1) if has_vae else 1
    extra = os.path.join(root, PROJECT_FILE)
    if os.path.isfile(extra):
        settings = ProjectSettings(**read_json(extra))
    else:  # diffusers folders from elsewhere, and the 0.1 layout: train_size from the index or the latent size
        settings = ProjectSettings(int(index.get("train_size", int(conf.get("sample_size", 128)) * factor)))
    return PipelineFolder(root, layout, settings, has_vae)


def scheduler_config(settings: ProjectSettings) -> dict:
    """``FlowMatchEulerDiscreteScheduler`` with the default schedule's shift (Lumina's ``t / (t + s - s t)`` is SD3's
    sigma shift s with sigma = 1 - t)."""
    shift = float(settings.sampling["shift"]) if settings.sampling["schedule"] == "shift" else 1.0
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": 1000, "shift": shift}  # fmt: skip


def write_transformer(
    folder: str, specs: list, cfg: NextDiTConfig, sample_size: int, force: bool = False, progress=None
):
    """A diffusers ``transformer/`` folder from project-named specs (streamed); returns the weights path."""
    path, side = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, "config.json")
    for existing in (path, side):
        refuse_existing(existing, force)
    write_safetensors(path, NEXTDIT.export(specs, cfg, DIFFUSERS), {"format": "pt"}, force, progress)
    write_json(side, transformer_config_json(cfg, sample_size), force)
    return path


def _write_vae(vae, folder: str):
    write_safetensors(os.path.join(folder, WEIGHTS_NAME), cell_specs(vae), {"format": "pt"})  # diffusers names
    write_json(os.path.join(folder, "config.json"), vae_config_json(vae.cfg))


def _write_text_encoder(encoder, tokenizer, folder: str):
    if not isinstance(encoder.cfg, GemmaConfig):
        raise ValueError("the diffusers layout holds Lumina-Next (Gemma); Lumina-T2I's LLaMA has no pipeline layout")
    write_safetensors(os.path.join(folder, "model.safetensors"), cell_specs(encoder), {"format": "pt"})
    write_json(os.path.join(folder, "config.json"), text_encoder_config_json(encoder.cfg))
    tokenizer.save_pretrained(folder)


def save_component(kind: str, folder: str, model, tokenizer=None, sample_size: int = 128) -> None:
    """One component folder, written whole or not at all: ``kind`` "transformer" (a ``NextDiT``; ``sample_size`` is
    the latent side of the training area), "vae" (an ``AutoencoderKL``) or "text_encoder" (Gemma + tokenizer)."""
    with staged_folder(folder) as tmp:
        if kind == "transformer":
            write_transformer(tmp, cell_specs(model), model.cfg, sample_size)
        elif kind == "vae":
            _write_vae(model, tmp)
        else:
            _write_text_encoder(model, tokenizer, tmp)


def save_pipeline(folder: str, settings: ProjectSettings, transformer, text_encoder, tokenizer, vae=None) -> None:
    """A pipeline folder (module docstring). ``transformer``: a ``NextDiT`` or ``(specs, cfg)``; ``text_encoder``:
    a Gemma ``DecoderEncoder`` or a transformers folder to copy; ``tokenizer``: a tokenizer or a folder holding its
    files; ``vae``: an ``AutoencoderKL``, a diffusers vae folder, or None for a pixel-space model."""
    specs, cfg = (cell_specs(transformer), transformer.cfg) if hasattr(transformer, "cfg") else transformer
    factor = (
        1 if vae is None else (vae.cfg if hasattr(vae, "cfg") else component_config(vae, vae_config)).downsample_factor
    )
    with staged_folder(folder) as tmp:
        write_transformer(os.path.join(tmp, "transformer"), specs, cfg, settings.train_size // factor)
        if isinstance(text_encoder, str):
            shutil.copytree(text_encoder, os.path.join(tmp, "text_encoder"))
        else:
            _write_text_encoder(text_encoder, tokenizer, os.path.join(tmp, "text_encoder"))
        if isinstance(tokenizer, str):  # tokenizer files only
            ignore = shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json", "*.bin", "config.json")
            shutil.copytree(tokenizer, os.path.join(tmp, "tokenizer"), ignore=ignore)
        else:
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        if isinstance(vae, str):
            shutil.copytree(vae_folder(vae), os.path.join(tmp, "vae"))
        elif vae is not None:
            _write_vae(vae, os.path.join(tmp, "vae"))
        write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), scheduler_config(settings))
        write_json(os.path.join(tmp, PROJECT_FILE), dataclasses.asdict(settings))
        if vae is not None:  # diffusers' LuminaPipeline needs one
            write_json(os.path.join(tmp, "model_index.json"), {
                "_class_name": "LuminaPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                "transformer": ["diffusers", "LuminaNextDiT2DModel"], "text_encoder": ["transformers", "GemmaModel"],
                "tokenizer": ["transformers", "GemmaTokenizerFast"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "vae": ["diffusers", "AutoencoderKL"],
            })  # fmt: skip


def rewrite_pipeline(source: str, folder: str, merge=None) -> PipelineFolder:
    """Any readable pipeline folder (e.g. the 0.1 layout) rewritten in the diffusers layout, tensors bit-identical:
    the transformer streamed from its file, the other components copied. ``merge(family, cfg, specs) -> (cfg, specs,
    words)`` changes the transformer (LoRA adapters merged); its words join a closed vocabulary."""
    src = read_pipeline(source)
    cfg, specs = NEXTDIT.plan(src.part("transformer"), component_config(src.part("transformer"), transformer_config))
    settings = src.settings
    if merge is not None:
        cfg, specs, words = merge(NEXTDIT, cfg, specs)
        if settings.vocabulary is not None and words:
            settings = dataclasses.replace(settings, vocabulary=sorted(set(settings.vocabulary) | set(words)))
    save_pipeline(folder, settings, (specs, cfg), src.part("text_encoder"), src.part("tokenizer"),
                  src.part("vae") if src.has_vae else None)  # fmt: skip
    return read_pipeline(folder)
