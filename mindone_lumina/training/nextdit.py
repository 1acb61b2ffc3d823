"""Next-DiT flow-matching training: the model from a recipe, the run, and the export as a pipeline folder."""

import hashlib
import json
import os
import shutil

import numpy as np

import mindspore as ms
from mindspore import Tensor

from .. import components
from ..atomic import check_creatable
from ..dtypes import ms_dtype
from ..io import diffusers_io
from ..models import lora, nextdit
from ..models.layers import parameter_count
from ..text.tokenizers import words
from ..weights import lora as lora_files
from ..weights.load import load_specs, param_shapes
from ..weights.rules import convert_tensors
from ..weights.tensors import ArrayCheckpoint
from . import loader
from .data import buckets
from .extract import extract, pending, store_meta
from .feature_store import FeatureStore
from .loop import fit
from .recipe import TrainConfig
from .sources import read_items
from .step import FlowMatchingLoss, Trainer


def build_model(cfg: TrainConfig, cap_dim: int) -> nextdit.NextDiT:
    arch = nextdit.resolve_config(cfg.model)
    if arch.cap_feat_dim != cap_dim:
        raise ValueError(f"model cap_feat_dim {arch.cap_feat_dim} != text encoder hidden size {cap_dim}")
    model = nextdit.NextDiT(arch)
    if cfg.init:  # any checkpoint the converter reads, streamed into the model
        load_specs(model, components.transformer_plan(cfg.init, arch)[2], cfg.init)
    if cfg.lora is not None:  # only the adapter trains; the frozen base is stored in the compute dtype
        lora.add_adapter(model, cfg.lora_config)
        frozen = [p for p in model.get_parameters() if not p.requires_grad]
        for p in frozen if cfg.precision != "fp32" else ():
            p.set_dtype(ms_dtype(cfg.precision))
    if cfg.recompute:
        for block in model.layers:
            block.recompute()
    return model


def open_samples(cfg: TrainConfig, rank: int = 0, world: int = 1, log=print):
    """The training samples of ``cfg``: ``OnlineSamples`` (features: online), or ``CachedSamples`` of the recipe's
    feature store, or else of one extracted into ``output/cache`` (each msrun rank its slice; reused and resumed)."""
    items = read_items(cfg.data)
    bucket_list = buckets(cfg.resolution, cfg.aspect_ratios, cfg.bucket_multiple)
    cache = os.path.join(cfg.output, "cache")
    check_creatable(cache)  # before any model loads: a run folder that cannot be written is named at once
    fresh = not os.path.exists(cfg.output)

    def models():
        encoder = components.load_text_encoder(cfg.text_encoder)
        tokenizer = components.load_tokenizer(cfg.text_encoder, encoder.cfg)
        return tokenizer, encoder, None if cfg.vae is None else components.load_vae(cfg.vae)

    if cfg.features == "online":
        # rank 0 reads the image headers and keeps the result in the run folder (only when some item is usable);
        # the other ranks read that, or scan themselves when the folder is not shared
        codes = loader.scan(items, bucket_list, cache, log) if rank == 0 else None
        _barrier(world)
        codes = loader.scan(items, bucket_list, cache, log) if codes is None else codes
        if not (codes >= 0).any():
            raise _nothing_to_train(cfg, items, loader.count_skipped(codes))
        return loader.OnlineSamples(items, codes, bucket_list, *models(), cfg.max_caption_tokens)
    meta = store_meta(items, cfg.text_encoder, cfg.vae, bucket_list, cfg.max_caption_tokens)
    if cfg.feature_store is not None:
        store = FeatureStore(cfg.feature_store)
        differ = sorted(k for k in ("text_encoder", "vae", "buckets", "max_caption_tokens") if store.meta[k] != meta[k])
        if differ:
            raise ValueError(f"feature_store {cfg.feature_store} was made with other {differ} than the recipe's")
        return loader.CachedSamples(store, cfg.max_caption_tokens)
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(cache, f"store-{key}")
    if pending(folder, meta, items, rank, world):
        extract(items, folder, meta, *models(), bucket_list, cfg.max_caption_tokens, rank, world, log=log)
    else:
        log(f"reusing the feature store {folder}")
    _barrier(world)  # every rank's part is complete before any rank reads the store
    store = FeatureStore(folder)
    if not len(store):  # every item skipped: the run leaves nothing behind (a fixed list is extracted anew)
        if rank == 0:
            shutil.rmtree(cfg.output if fresh else folder, ignore_errors=True)
        raise _nothing_to_train(cfg, items, loader.by_reason(store.skipped))
    return loader.CachedSamples(store, cfg.max_caption_tokens)


def _barrier(world: int) -> None:
    if world > 1:
        from mindspore.mint.distributed import barrier

        barrier()


def _nothing_to_train(cfg: TrainConfig, items: list, skipped: dict) -> ValueError:
    return ValueError(f"none of the {len(items)} items of {cfg.data} can be trained on (skipped: {skipped})")


def train(cfg: TrainConfig, rank: int = 0, world: int = 1, log=print, stop_after=None, progress: bool = True):
    """Train (or resume) the Next-DiT run in ``cfg.output``; returns the trainer. ``stop_after`` ends early (tests)."""
    ms.set_context(mode=ms.GRAPH_MODE if cfg.mode == "graph" else ms.PYNATIVE_MODE)
    samples = open_samples(cfg, rank, world, log)
    skipped = dict(samples.skipped)
    log(f"skipped data: {skipped or 'none'}")
    ms.set_seed(cfg.seed)  # here: the initial weights do not depend on what the loaders above drew
    model = build_model(cfg, samples.cap_dim)
    clock = lora.dropout_clock(model)  # LoRA dropout: masks by micro-batch, so a resumed run draws the same
    trainer = Trainer(FlowMatchingLoss(model, clock), cfg, world)
    tables = {}  # RoPE inputs per latent size
    failed = {"count": 0}  # images unreadable when a batch read them (after the scan), this rank

    def batches(first: int, last: int):
        stream = loader.batches(samples, cfg, first, last, rank, world, cfg.loader_workers)
        for micro, (x1, x0, t, feats, mask, idx, bad) in enumerate(stream, start=first):
            if bad:
                failed["count"] += bad
                log(f"{bad} image(s) of micro-batch {idx.tolist()} could not be read: replaced within the batch")
            if x1.shape[2:] not in tables:
                tables[x1.shape[2:]] = nextdit.rope_inputs(model.cfg, x1.shape[2], x1.shape[3], 1.0)
            tick = () if clock is None else (Tensor(float(micro * world + rank), ms.float32),)
            yield (*map(Tensor, (x1, x0, t, feats, mask)), *tables[x1.shape[2:]], *tick), idx

    def data_state() -> dict:
        return {"skipped_data": skipped, "unreadable_in_training": failed["count"]}

    trained = sum(int(np.prod(p.shape)) for p in trainer.params)
    what = (f"Next-DiT {parameter_count(model):,} parameters ({trained:,} trained), {samples.size} samples "
            f"({cfg.features} features)")  # fmt: skip
    return fit(cfg, trainer, batches, what, rank, world, log, stop_after, progress, data_state)


def export_pipeline(cfg: TrainConfig, trainer: Trainer, folder: str, use_ema: bool = True) -> str | None:
    """Write the trained model (EMA weights by default) as a pipeline folder in the diffusers layout
    (``io.diffusers_io``) with the recipe's text encoder, tokenizer and VAE folders, its training size and sampling
    defaults; a LoRA run writes its adapter as a peft folder (``weights.lora``) with the captions' words."""
    model = trainer.loss.model
    source = trainer.ema if use_ema else trainer.params
    if cfg.lora is not None:
        arrays = {n.replace(".adapters.0.", "."): p.asnumpy() for n, p in zip(trainer.param_names, source)}
        lora_files.save_adapter(model, folder, arrays=arrays, vocabulary=caption_words(cfg))
        return "a LoRA adapter: tools/sample.py --lora " + folder
    arrays = ArrayCheckpoint({n: p.asnumpy() for n, p in zip(trainer.param_names, source)})
    specs = convert_tensors(arrays, None, param_shapes(model), what="the trained weights")
    vocabulary = caption_words(cfg)
    settings = diffusers_io.ProjectSettings(cfg.resolution, sampling=dict(cfg.sampling),
                                            vocabulary=vocabulary if cfg.closed_vocabulary else None)  # fmt: skip
    diffusers_io.save_pipeline(folder, settings, (specs, model.cfg), cfg.text_encoder, cfg.text_encoder, cfg.vae)


def caption_words(cfg: TrainConfig) -> list:
    """The words of the recipe's captions, sorted (recorded with an export: prompts with others warn)."""
    return sorted({w for item in read_items(cfg.data) if item.caption for w in words(item.caption)})
