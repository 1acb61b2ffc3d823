"""Next-DiT flow-matching training: the model from a recipe, the run, and the export as a pipeline folder."""

import mindspore as ms
from mindspore import Tensor

from .. import components
from ..io import diffusers_io
from ..models import nextdit
from ..models.layers import parameter_count
from ..text.tokenizers import words
from ..weights.load import load_specs, param_shapes
from ..weights.rules import convert_tensors
from ..weights.tensors import ArrayCheckpoint
from .data import make_batch, prepare_data, read_captions
from .loop import fit
from .recipe import TrainConfig
from .step import FlowMatchingLoss, Trainer


def build_model(cfg: TrainConfig, cap_dim: int) -> nextdit.NextDiT:
    arch = nextdit.resolve_config(cfg.model)
    if arch.cap_feat_dim != cap_dim:
        raise ValueError(f"model cap_feat_dim {arch.cap_feat_dim} != text encoder hidden size {cap_dim}")
    model = nextdit.NextDiT(arch)
    if cfg.init:  # any checkpoint the converter reads, streamed into the model
        load_specs(model, components.transformer_plan(cfg.init, arch)[2], cfg.init)
    if cfg.recompute:
        for block in model.layers:
            block.recompute()
    return model


def train(cfg: TrainConfig, rank: int = 0, world: int = 1, log=print, stop_after=None, progress: bool = True):
    """Train (or resume) the Next-DiT run in ``cfg.output``; returns the trainer. ``stop_after`` ends early (tests)."""
    ms.set_context(mode=ms.GRAPH_MODE if cfg.mode == "graph" else ms.PYNATIVE_MODE)
    encoder = components.load_text_encoder(cfg.text_encoder)
    tokenizer = components.load_tokenizer(cfg.text_encoder, encoder.cfg)
    vae = None if cfg.vae is None else components.load_vae(cfg.vae)
    ds = prepare_data(cfg, tokenizer, encoder, vae, log)
    del encoder, vae
    ms.set_seed(cfg.seed)  # here: the initial weights do not depend on what the loaders above drew
    model = build_model(cfg, ds.cap_feats.shape[-1])
    trainer = Trainer(FlowMatchingLoss(model), cfg, world)
    tables = {}  # RoPE inputs per latent size

    def batch_at(index: int):
        x1, x0, t, feats, mask, idx = make_batch(ds, cfg, index, rank, world)
        if x1.shape[2:] not in tables:
            tables[x1.shape[2:]] = nextdit.rope_inputs(model.cfg, x1.shape[2], x1.shape[3], 1.0)
        return (*map(Tensor, (x1, x0, t, feats, mask)), *tables[x1.shape[2:]]), idx

    what = f"Next-DiT {parameter_count(model):,} parameters, {len(ds.latents)} samples"
    return fit(cfg, trainer, batch_at, what, rank, world, log, stop_after, progress)


def export_pipeline(cfg: TrainConfig, trainer: Trainer, folder: str, use_ema: bool = True) -> None:
    """Write the trained model (EMA weights by default) as a pipeline folder in the diffusers layout
    (``io.diffusers_io``) with the recipe's text encoder, tokenizer and VAE folders, its training size and sampling
    defaults."""
    model = trainer.loss.model
    source = trainer.ema if use_ema else trainer.params
    arrays = ArrayCheckpoint({n: p.asnumpy() for n, p in zip(trainer.param_names, source)})
    specs = convert_tensors(arrays, None, param_shapes(model), what="the trained weights")
    vocabulary = sorted({w for row in read_captions(cfg.data) for w in words(row["caption"])})
    settings = diffusers_io.ProjectSettings(cfg.resolution, sampling=dict(cfg.sampling),
                                            vocabulary=vocabulary if cfg.closed_vocabulary else None)  # fmt: skip
    diffusers_io.save_pipeline(folder, settings, (specs, model.cfg), cfg.text_encoder, cfg.text_encoder, cfg.vae)
