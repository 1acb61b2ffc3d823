"""Training recipes: the fields every recipe has (images, optimiser, loop) and the Next-DiT flow-matching recipe.
``configs/*.yaml`` map onto a recipe's fields one to one; unknown or missing keys are errors naming them."""

import dataclasses
import math
from dataclasses import dataclass

from ..atomic import read_yaml
from ..dtypes import SHORT


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """What every training recipe has: images, the optimiser, the loop. ``configs/*.yaml`` map onto the fields of a
    subclass one to one (unknown keys are an error)."""

    data: str | list  # folder(s) with captions.jsonl, .json/.jsonl lists, Lumina .yaml data configs (sources.py)
    output: str  # run folder: checkpoints/, cache/, exports
    resolution: int = 1024  # pixels per side of the target area; buckets keep about resolution^2 pixels
    aspect_ratios: tuple = (1.0,)  # width / height of the buckets
    bucket_multiple: int = 16
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    seed: int = 0
    save_every: int = 500
    log_every: int = 50
    mode: str = "graph"
    precision: str = "fp32"  # compute dtype: fp32, fp16 (CPU and Ascend) or bf16 (Ascend); weights stay fp32
    loss_scale: float = 4096.0  # initial dynamic loss scale for fp16 (halved on overflow, doubled after 1000 steps)
    zero_stage: int = 0  # 1: AdamW state sharded across the data-parallel ranks (mindone ZeRO stage 1)
    init: str | None = None  # weights to start from (a fine-tune): any format the model's loader reads

    def __post_init__(self):
        object.__setattr__(self, "aspect_ratios", tuple(self.aspect_ratios))
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.mode not in ("graph", "pynative"):
            raise ValueError(f"mode must be graph or pynative, got {self.mode!r}")
        if self.precision not in SHORT:
            raise ValueError(f"precision must be one of {sorted(SHORT)}, got {self.precision!r}")
        if self.precision != "fp32" and self.mode != "graph":
            # measured: MindSpore 2.10 PyNative with Cell.to_float(fp16) returns NaN for Next-DiT on CPU
            raise ValueError(f"precision {self.precision} needs mode graph (mixed precision is cast by the compiler)")
        if self.zero_stage not in (0, 1):
            # stages 2-3 shard gradients with ReduceScatter, which MindSpore 2.10 lacks on CPU: they could not be tested
            raise ValueError(f"zero_stage must be 0 or 1 (stages 2 and 3 are not implemented), got {self.zero_stage}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("batch_size", "grad_accum", "steps", "save_every", "log_every", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_yaml(cls, path: str, **overrides):
        """The recipe in the YAML file ``path``; ``overrides`` that are not None replace its keys."""
        raw = read_yaml(path, "recipe")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        fields = dataclasses.fields(cls)
        unknown = sorted(set(raw) - {f.name for f in fields})
        if unknown:
            raise ValueError(f"{path}: unknown recipe key(s) {unknown}; known keys: {sorted(f.name for f in fields)}")
        missing = [
            f.name for f in fields if f.name not in raw and dataclasses.MISSING is f.default is f.default_factory
        ]
        if missing:
            raise ValueError(f"{path}: the recipe needs key(s) {missing}")
        return cls(**raw)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Recipe):
    """A Next-DiT flow-matching recipe (``tools/train.py``)."""

    model: dict | str = "nextdit-2b-gqa"  # a Next-DiT preset or constructor arguments
    text_encoder: str = ""  # Hugging Face Gemma folder (config, safetensors, tokenizer files)
    vae: str | None = None  # diffusers vae/ folder; None trains in pixel space (images in [-1, 1])
    caption_dropout: float = 0.1  # to the empty prompt, for classifier-free guidance
    max_caption_tokens: int = 256
    t_sampling: str = "uniform"  # or "logit_normal"
    recompute: bool = False
    features: str = "cached"  # cached: latents and caption features from a feature store; online: encoded per batch
    feature_store: str | None = None  # cached: a store of tools/extract_features.py; None: extracted into output/cache
    loader_workers: int = 2  # processes preparing batches ahead of the step (0: in the training process)
    sampling: dict = dataclasses.field(default_factory=dict)  # SampleSettings defaults recorded with the export
    closed_vocabulary: bool = False  # record the captions' words with the export: prompts with others then warn
    lora: dict | None = None  # LoRA fine-tune (models.lora.LoRAConfig: rank, alpha, dropout, targets, rslora)

    def __post_init__(self):
        super().__post_init__()
        if self.t_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"t_sampling must be uniform or logit_normal, got {self.t_sampling!r}")
        if self.features not in ("cached", "online"):
            raise ValueError(f"features must be cached or online, got {self.features!r}")
        if self.feature_store is not None and self.features != "cached":
            raise ValueError("feature_store is read in features: cached only")
        if self.loader_workers < 0:
            raise ValueError(f"loader_workers must be >= 0, got {self.loader_workers}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.lora is not None:
            if not isinstance(self.lora, dict):
                raise ValueError(f"lora must be a mapping (rank, alpha, dropout, targets, rslora), got {self.lora!r}")
            _ = self.lora_config  # checked here, before any model loads
            if not self.init:
                raise ValueError("lora fine-tunes a trained model: the recipe needs init (or --init)")

    @property
    def lora_config(self):
        """The ``lora:`` section as a ``LoRAConfig`` (None: full training)."""
        from ..models.lora import LoRAConfig

        return None if self.lora is None else LoRAConfig.from_dict(self.lora)


def lr_at(cfg: Recipe, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to 0 at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------------------------
# Data: buckets, images, cached latents and caption features
# ------------------------------------------------------------------------------------------------------------------
