"""Fast recipe probe for the default model: the shapes-demo training in PyTorch, to compare recipe variants.

    python benchmarks/probe_shapes_recipe.py --store runs/shapes-demo/cache/store-* \
        --text-encoder data/text_encoder [--steps 1400] [--batch 32] [--lr 1e-3] [--schedule cosine] [--ema 0.998]
        [--t-sampling uniform] [--dim 128] [--layers 5] [--eval-every 700] [--prompts 96]
        [--latent [--vae-steps 1500] [--latent-channels 4] [--vae-out vae.pt]]

The project's MindSpore training step runs about 5x slower than PyTorch on this 2-core CPU (``bench_train.py``), so a
recipe is cheaper to probe here and then trained with ``tools/train.py``. The model is diffusers'
``LuminaNextDiT2DModel`` (the same network as ``models.nextdit.NextDiT``, parity-tested) initialised as
``models/nextdit.py`` does (xavier linears; zero adaLN, final layer, caption projection and cross-attention gates); the
data are the latents and caption features of a feature store (``tools/extract_features.py``, or the one
``tools/train.py`` extracts into its run folder; the probe trains on its largest bucket), the loss, AdamW, clipping,
warm-up + cosine and EMA are the ``training`` package's. Every ``--eval-every`` steps the EMA weights sample
held-out prompts (midpoint, 30 grid points, shift 4, CFG 4, as the pipeline's defaults) and ``shapes.score`` reads
them back. A probe,
not a parity test: its numbers say which recipe learns faster, not what the MindSpore run will score.

``--latent`` probes a latent-space model instead: a small diffusers ``AutoencoderKL`` (channels 32/64/64, one resnet
per block, 4 latent channels, 8x8 latents for 32 px) is first trained on the cached images (MSE plus a light KL term,
batch 32, AdamW 1e-3), the images are encoded to its posterior means scaled to unit variance, and the Next-DiT works on
those with patch 1 (the same 64 tokens as pixels with patch 4); samples are decoded before they are scored.
"""

import argparse
import contextlib
import math
import os
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, LuminaNextDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

import mindspore as ms

from mindone_lumina import sampling, shapes
from mindone_lumina.components import load_text_encoder
from mindone_lumina.text.gemma import encode_prompts
from mindone_lumina.text.tokenizers import load_tokenizer
from mindone_lumina.training import loader
from mindone_lumina.training.feature_store import FeatureStore


def build_model(args) -> LuminaNextDiT2DModel:
    model = LuminaNextDiT2DModel(
        sample_size=args.resolution // args.patch, patch_size=args.patch, in_channels=args.in_channels,
        hidden_size=args.dim,
        num_layers=args.layers, num_attention_heads=args.heads, num_kv_heads=args.kv_heads, multiple_of=64,
        learn_sigma=False, qk_norm=True, cross_attention_dim=args.cap_dim,
    )  # fmt: skip
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    zero = ("norm1.linear", "norm_out.linear", "caption_embedder.1", "gate")  # zero-initialised in models/nextdit.py
    for name, param in model.named_parameters():
        if any(part in name for part in zero):
            torch.nn.init.zeros_(param)
    return model


def eval_features(text_encoder: str, prompts: list):
    """[cond..., uncond...] caption features of ``prompts`` from the project's encoder, as the pipeline encodes."""
    ms.set_device("CPU")
    tokenizer, encoder = load_tokenizer(text_encoder, "gemma"), load_text_encoder(text_encoder)
    feats, mask = encode_prompts(tokenizer, encoder, prompts, negative_prompt="")
    return torch.from_numpy(feats.asnumpy()), torch.from_numpy(mask.asnumpy()).bool()


def train_vae(images: torch.Tensor, steps: int, channels: int, kl: float = 1e-4, batch: int = 32) -> AutoencoderKL:
    """A small ``AutoencoderKL`` fitted to ``images`` (N, 3, H, W) in [-1, 1]; two downsamples, so H/4 latents."""
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
        latent_channels=channels, norm_num_groups=32, sample_size=images.shape[-1],
    )  # fmt: skip
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    rng, start = np.random.default_rng(1), time.time()
    for step in range(steps):
        x = images[torch.from_numpy(rng.integers(0, len(images), batch))]
        posterior = vae.encode(x).latent_dist
        mse = ((vae.decode(posterior.sample()).sample - x) ** 2).mean()
        loss = mse + kl * posterior.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            print(f"# VAE step {step + 1}: MSE {mse.item():.4f}, {time.time() - start:.0f} s", flush=True)
    return vae.eval()


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor) -> tuple:
    """Posterior means of ``images`` scaled to unit variance, and that scale."""
    z = torch.cat([vae.encode(images[i : i + 500]).latent_dist.mode() for i in range(0, len(images), 500)])
    scale = float(z.std())
    return z / scale, scale


@torch.no_grad()
def sample(model, rope, feats, mask, n: int, size: int, cfg: float = 4.0, channels: int = 3) -> torch.Tensor:
    """Midpoint over the shift-4 grid with CFG on all channels, as ``TextToImagePipeline`` defaults; (n, C, H, W)."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((n, channels, size, size)).astype(np.float32))

    def velocity(x, t):
        out = model(torch.cat([x, x]), torch.full((2 * n,), float(t)), feats, mask, rope, cross_attention_kwargs={},
                    return_dict=False)[0]  # fmt: skip
        return out[n:] + cfg * (out[:n] - out[n:])

    grid = sampling.time_grid(30, "shift", 4.0)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        x = x + (t1 - t0) * velocity(x + 0.5 * (t1 - t0) * velocity(x, t0), t0 + 0.5 * (t1 - t0))
    return x


def learning_rate(args, step: int) -> float:
    """Linear warm-up to ``args.lr``, then constant or cosine to zero at ``args.steps`` (the ``training`` package's)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))
    return args.lr


def optimizer_step(model, opt, params, ema, x1, x0, t, feats, mask, rope, lr: float, ema_decay: float) -> float:
    """One flow-matching step (velocity loss, clipping at 1.0, AdamW at ``lr``, EMA); returns the loss."""
    tt = t.reshape(-1, 1, 1, 1)
    v = model(tt * x1 + (1 - tt) * x0, t, feats, mask, rope, cross_attention_kwargs={}, return_dict=False)[0]
    loss = ((v - (x1 - x0)) ** 2).mean()
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(ema, [q.detach() for q in params], 1 - ema_decay)
    return loss.item()


@contextlib.contextmanager
def ema_weights(model, params, ema):
    """The model in eval mode with the EMA weights inside the block; the live weights and train mode after it."""
    live = [q.detach().clone() for q in params]
    with torch.no_grad():
        for q, e in zip(params, ema):
            q.copy_(e)
    try:
        yield model.eval()
    finally:
        with torch.no_grad():
            for q, w in zip(params, live):
                q.copy_(w)
        model.train()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return np.round(np.clip((x.numpy() + 1) / 2, 0, 1).transpose(0, 2, 3, 1) * 255).astype(np.uint8)


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe flags both probes share: optimisation, t sampling, caption dropout and the Next-DiT's size."""
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--t-sampling", default="uniform", choices=["uniform", "logit_normal"])
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="a feature store (tools/extract_features.py, or run/cache/store-*)")
    p.add_argument("--text-encoder", required=True)
    p.add_argument("--steps", type=int, default=1400)
    add_recipe_arguments(p)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=700)
    p.add_argument("--prompts", type=int, default=96, help="held-out prompts per evaluation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latent", action="store_true", help="train a small VAE first and the Next-DiT on its latents")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--latent-patch", type=int, default=1, help="Next-DiT patch size on the latents")
    p.add_argument("--vae-out", default=None, help="save the probe's VAE here (torch state dict), or reuse it")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    samples = loader.CachedSamples(FeatureStore(args.store), max_tokens=256)
    group = max(samples.groups, key=len)  # one bucket: the probe trains at one size
    x_all, caps, masks, _ = samples.fetch(group, np.zeros(len(group), bool))
    _, empty, empty_mask, _ = samples.fetch(group[:1], np.ones(1, bool))  # the dropped caption
    n = len(group)
    x_all, caps, masks = torch.from_numpy(x_all), torch.from_numpy(caps), torch.from_numpy(masks).bool()  # (N, C, H, W)
    empty, empty_mask = torch.from_numpy(empty[0]), torch.from_numpy(empty_mask[0]).bool()
    vae, scale = None, 1.0
    if args.latent:
        if args.vae_out and os.path.exists(args.vae_out):
            vae = train_vae(x_all, 0, args.latent_channels)
            vae.load_state_dict(torch.load(args.vae_out))
        else:
            vae = train_vae(x_all, args.vae_steps, args.latent_channels, batch=args.vae_batch)
            if args.vae_out:
                torch.save(vae.state_dict(), args.vae_out)
        x_all, scale = encode(vae, x_all)
        args.patch = args.latent_patch
    args.resolution, args.cap_dim, args.in_channels = x_all.shape[-1], caps.shape[-1], x_all.shape[1]
    prompts = [shapes.caption(s) for s in shapes.heldout_scenes(args.prompts, seed=0)]
    eval_feats, eval_mask = eval_features(args.text_encoder, prompts)

    model = build_model(args).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = [q.detach().clone() for q in params]
    rope = get_2d_rotary_pos_embed_lumina(args.dim // args.heads, 384, 384)
    rng, start, losses = np.random.default_rng(0), time.perf_counter(), []
    print(f"# {vars(args)}; {sum(q.numel() for q in params):,} parameters, {n} samples")
    print("| step | loss (mean of last 200) | s | background | shape colour | shape class | size | position |")
    print("|---|---|---|---|---|---|---|---|")
    for step in range(args.steps):
        idx = torch.from_numpy(rng.integers(0, n, args.batch))
        x1, x0 = x_all[idx], torch.randn(args.batch, *x_all.shape[1:])
        t = torch.sigmoid(torch.randn(args.batch)) if args.t_sampling == "logit_normal" else torch.rand(args.batch)
        feats, mask = caps[idx].clone(), masks[idx].clone()
        drop = torch.rand(args.batch) < args.caption_dropout
        feats[drop], mask[drop] = empty, empty_mask
        losses.append(optimizer_step(model, opt, params, ema, x1, x0, t, feats, mask, rope, learning_rate(args, step),
                                     args.ema))  # fmt: skip
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            with ema_weights(model, params, ema):
                x = sample(model, rope, eval_feats, eval_mask, len(prompts), args.resolution, 4.0, args.in_channels)
                with torch.no_grad():
                    images = to_uint8(x if vae is None else vae.decode(x * scale).sample)
            acc = shapes.score(prompts, list(images))
            print(f"| {step + 1} | {np.mean(losses[-200:]):.4f} | {time.perf_counter() - start:.0f} | "
                  + " | ".join(f"{acc[k]:.1%}" for k in ("background", "colour", "shape", "size", "position"))
                  + " |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
