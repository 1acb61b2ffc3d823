"""Caption-variety probe for the default model (issue #23): how fast the Next-DiT learns shapes from varied captions.

    python benchmarks/probe_caption_variety.py [--captions canonical|variety] [--jitter] [--text-encoder DIR]
        [--steps 4000] [--eval-every 2000] [--prompts 48] [--t-sampling uniform|logit_normal] [--lr 1e-3]
        [--patch 2] [--threads 1]

Unlike ``probe_shapes_recipe.py`` this needs no cache from ``tools/train.py``: the 32 px shapes data are drawn in
memory (``shapes.train_scenes``, as ``tools/make_shapes_dataset.py [--variety]`` draws them: ``--jitter`` moves and
resizes each shape a little, ``--captions variety`` draws each caption's form and phrasing), encoded by the bundled
model's VAE loaded in diffusers (the same weights the pipeline decodes with) and by the project's text encoder in
``--text-encoder`` (for varied captions, one made by ``tools/make_text_encoder.py`` on such captions, with or without
``--teach-shapes``). The Next-DiT, loss, optimizer and sampler are ``probe_shapes_recipe.py``'s (PyTorch, about 12x
faster per step than the MindSpore step on this CPU). Every ``--eval-every`` steps the EMA weights sample the held-out
prompts of every caption form (``shapes.heldout_prompts``) plus the canonical long form, at the pipeline's defaults,
and ``shapes.score`` reads them back. A probe for choosing a recipe, not the shipped model's score.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe_shapes_recipe as probe  # noqa: E402

from mindone_lumina import shapes  # noqa: E402

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "mindone_lumina", "assets", "shapes-demo")


def make_data(args, vae) -> tuple:
    """(scaled VAE latents (N, 4, h, w), captions) of ``args.num`` training scenes."""
    scenes = shapes.train_scenes(args.num, 0)
    rng = np.random.default_rng([0, 1])
    images = np.stack([shapes.render(s, args.size, rng if args.jitter else None) for s in scenes])
    captions = [shapes.caption(s, rng if args.captions == "variety" else None) for s in scenes]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i : i + 500]).latent_dist.mode() for i in range(0, len(x), 500)])
    return z * vae.config.scaling_factor, captions


def evaluate(model, rope, vae, args, evals: dict) -> str:
    cells = []
    for prompts, feats, mask in evals.values():
        x = probe.sample(model, rope, feats, mask, len(prompts), args.resolution, 4.0, args.in_channels)
        with torch.no_grad():
            images = probe.to_uint8(vae.decode(x / vae.config.scaling_factor).sample)
        acc = shapes.score(prompts, list(images))
        named = f" / {acc['position']:.0%}" if acc.get("position") is not None else ""
        cells.append(f"{acc['background']:.0%} / {acc['colour']:.0%} / {acc['shape']:.0%}{named}")
    return " | ".join(cells)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=20000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--jitter", action="store_true")
    p.add_argument("--captions", default="canonical", choices=["canonical", "variety"])
    p.add_argument("--text-encoder", default=os.path.join(ASSETS, "text_encoder"))
    p.add_argument("--vae", default=os.path.join(ASSETS, "vae"))
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--eval-every", type=int, default=2000)
    p.add_argument("--prompts", type=int, default=48, help="held-out prompts per caption form")
    probe.add_recipe_arguments(p)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    z, captions = make_data(args, vae)
    feats, mask = probe.eval_features(args.text_encoder, captions)  # [cond (N)..., uncond (N)...]
    n = len(captions)
    feats, mask, empty, empty_mask = feats[:n], mask[:n], feats[n], mask[n]
    evals = {form: shapes.heldout_prompts(args.prompts, form, seed=0) for form in shapes.FORMS}
    evals["canonical"] = [shapes.caption(s) for s in shapes.heldout_scenes(args.prompts, seed=0)]
    evals = {form: (prompts, *probe.eval_features(args.text_encoder, prompts)) for form, prompts in evals.items()}
    args.resolution, args.cap_dim, args.in_channels = z.shape[-1], feats.shape[-1], z.shape[1]
    model = probe.build_model(args).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = [q.detach().clone() for q in params]
    rope = get_2d_rotary_pos_embed_lumina(args.dim // args.heads, 384, 384)
    print(f"# {vars(args)}; data and features {time.perf_counter() - start:.0f} s")
    print("| step | loss (mean of last 200) | s | " + " | ".join(evals) + " |")
    print("|---" * (3 + len(evals)) + "|")
    rng, start, losses = np.random.default_rng(0), time.perf_counter(), []
    for step in range(args.steps):
        idx = torch.from_numpy(rng.integers(0, n, args.batch))
        x1, x0 = z[idx], torch.randn(args.batch, *z.shape[1:])
        t = torch.sigmoid(torch.randn(args.batch)) if args.t_sampling == "logit_normal" else torch.rand(args.batch)
        f, m = feats[idx].clone(), mask[idx].clone()
        drop = torch.rand(args.batch) < args.caption_dropout  # the empty caption: BOS, padded to the batch length
        f[drop], m[drop] = 0.0, False
        f[drop, : len(empty)], m[drop, : len(empty_mask)] = empty, empty_mask
        lr = probe.learning_rate(args, step)
        losses.append(probe.optimizer_step(model, opt, params, ema, x1, x0, t, f, m, rope, lr, args.ema))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            with probe.ema_weights(model, params, ema), torch.no_grad():
                row = evaluate(model, rope, vae, args, evals)
            elapsed = time.perf_counter() - start
            print(f"| {step + 1} | {np.mean(losses[-200:]):.4f} | {elapsed:.0f} | {row} |", flush=True)


if __name__ == "__main__":
    main()
