"""Per-device training memory of nextdit-2b-gqa at 1024^2 on 64 GB Ascend 910B devices, by ZeRO stage and device
count, with and without per-block recompute: the largest per-device batch that fits, and the smallest setup that
reaches a global batch without gradient accumulation (512: the Lumina-T2I recipe's global batch).

    python benchmarks/memory_plan.py [--global-batch 512] [--caption 256] [--hbm 64] [--features cached|online]
    python benchmarks/memory_plan.py --lora 32 [--lora-targets attention,feed_forward[,adaln]] [--batch 8]

An analytic plan, not a measurement. Assumptions (bf16 compute with fp32 master weights, AdamW, flash attention):
- model states per parameter: bf16 weights 2 B, bf16 gradients 2 B, fp32 master + Adam m + v 12 B (ZeRO: stage 1
  shards the 12 B, stage 2 also the gradients, stage 3 also the weights), plus an fp32 EMA copy (4 B) sharded with
  the optimizer states;
- activations kept for backward per block and sample: 16 tensors of (L, dim) and 4 of (L, ffn) in bf16 (inputs of
  every linear, norm, modulation, gate and the SwiGLU product), plus the cross-attention keys/values; flash attention
  keeps only the (L, heads) softmax statistics, never L^2. With recompute only each block's input is kept, plus
  one block's activations during its backward;
- 10% of HBM reserved for the framework, workspace and fragmentation;
- ``--features online`` (the recipe's ``features: online``): the frozen Gemma-2B and SDXL-VAE encoder stay on every
  device in bf16 (their weights, 2 B a parameter, a column of their own); their activations need no gradients and
  are freed before the Next-DiT forward (the VAE's largest, about 4 tensors of 128 x 1024^2 per image, is below the
  per-sample activations of training), so they add nothing to the peak. ``cached`` streams features from a store;
- ``--lora RANK`` (the recipe's ``lora:``): the whole Next-DiT is frozen and kept in bf16 (2 B a parameter, no
  gradients, optimizer state or EMA); each targeted linear of every block gets A (rank, in) and B (out, rank)
  (``lora_parameters``), trained in fp32: weights 4 B, gradients 4 B, Adam m + v 8 B, EMA 4 B; ZeRO stage 1 shards
  the 12 B of moments and EMA (stages 2-3 are left out: they would shard at most the adapter's 8 B of weights and
  gradients, well under 1 GB). Activations as in full training (the backward still runs through every frozen block
  for the input gradients), plus each adapter's bf16 (rows, rank) output of A, the input of B; no dropout masks
  (``dropout: 0``). As for full training, the fp32 gradient accumulation buffer of ``grad_accum`` > 1 (4 B per
  trained parameter, here per adapter parameter) is not in the table.
"""

import argparse

from mindone_lumina.models.nextdit import PRESETS

GB = 1024**3
FROZEN_PARAMS = 2_506_172_416 + 34_163_592  # Gemma-2B; the SDXL-VAE encoder and quant_conv (features: online)
LORA_TARGETS = ("attention", "feed_forward", "adaln")


def lora_layers(cfg, targets=("attention", "feed_forward")) -> list:
    """(name in a block, in features, out features) of each linear a LoRA adapter wraps in one Next-DiT block:
    ``attention``: wq, wk, wv, wo, wk_y, wv_y (and wq_y with ``separate_cross_query``); ``feed_forward``: w1, w2,
    w3; ``adaln``: adaLN_modulation.1 (cond_dim -> 4 dim). The final layer and the embedders are never targeted."""
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; expected a subset of {list(LORA_TARGETS)}")
    d, kv, y, h = cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.cap_feat_dim, cfg.ffn_hidden
    attn = [("wq", d, d), ("wk", d, kv), ("wv", d, kv), ("wo", d, d), ("wk_y", y, kv), ("wv_y", y, kv)]
    attn += [("wq_y", d, d)] if cfg.separate_cross_query else []
    layers = {
        "attention": [(f"attention.{n}", i, o) for n, i, o in attn],
        "feed_forward": [("feed_forward.w1", d, h), ("feed_forward.w2", h, d), ("feed_forward.w3", d, h)],
        "adaln": [("adaLN_modulation.1", cfg.cond_dim, 4 * d)],
    }
    return [layer for t in LORA_TARGETS if t in targets for layer in layers[t]]


def lora_parameters(cfg, rank: int, targets=("attention", "feed_forward")) -> int:
    """Adapter parameters of the whole model: rank * (in + out) per targeted linear (A and B), times the blocks."""
    return cfg.n_layers * sum(rank * (i + o) for _, i, o in lora_layers(cfg, targets))


def plan(devices: int, stage: int, recompute: bool, batch: int, caption: int, lora: int = 0, targets=()):
    cfg = PRESETS["nextdit-2b-gqa"]
    p = cfg.num_parameters()
    tokens = (1024 // 16) ** 2  # 4096 image tokens at 1024^2 (VAE /8, patch 2)
    kv = cfg.kv_heads * cfg.head_dim
    per_block = 2 * (16 * tokens * cfg.dim + 4 * tokens * cfg.ffn_hidden + 2 * caption * kv) + 8 * tokens * cfg.n_heads
    if lora:
        a = lora_parameters(cfg, lora, targets)
        weights, grads = 2 * p + 4 * a, 4 * a  # frozen bf16 base; fp32 adapter and its gradients
        states = (8 + 4) * a / (devices if stage >= 1 else 1)  # Adam m + v, and the EMA
        rows = {"adaLN_modulation.1": 1, "attention.wk_y": caption, "attention.wv_y": caption}
        per_block += 2 * lora * sum(rows.get(name, tokens) for name, _, _ in lora_layers(cfg, targets))
    else:
        weights = 2 * p / (devices if stage >= 3 else 1)
        grads = 2 * p / (devices if stage >= 2 else 1)
        states = (12 + 4) * p / (devices if stage >= 1 else 1)  # master + m + v, and the EMA
    if recompute:
        acts = batch * (cfg.n_layers * 2 * tokens * cfg.dim + per_block)
    else:
        acts = batch * cfg.n_layers * per_block
    return {"weights": weights, "grads": grads, "states": states, "acts": acts}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--global-batch", type=int, default=512)
    ap.add_argument("--caption", type=int, default=256, help="caption tokens")
    ap.add_argument("--hbm", type=float, default=64.0, help="device memory in GB")
    ap.add_argument("--features", choices=("cached", "online"), default="cached",
                    help="online: the frozen text encoder and VAE are on every device too")  # fmt: skip
    ap.add_argument("--lora", type=int, default=0, metavar="RANK", help="LoRA fine-tuning at this rank")
    ap.add_argument("--lora-targets", default="attention,feed_forward", help=f"comma-separated, of {LORA_TARGETS}")
    ap.add_argument("--batch", type=int, help="also print the per-device memory at this batch (ZeRO 0)")
    args = ap.parse_args()
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    budget = 0.9 * args.hbm * GB
    frozen = 2 * FROZEN_PARAMS if args.features == "online" else 0
    extra = " frozen encoders GB |" if frozen else ""
    cfg = PRESETS["nextdit-2b-gqa"]
    stages, digits, what = (0, 1, 2, 3), 1, ""
    if args.lora:
        a = lora_parameters(cfg, args.lora, targets)
        stages, digits = (0, 1), 2
        what = (f"; LoRA rank {args.lora} on {'+'.join(targets)}: {a:,} adapter parameters (fp32), "
                f"{cfg.num_parameters():,} frozen (bf16); ZeRO 2-3 not needed")  # fmt: skip
    print(f"# nextdit-2b-gqa, 1024^2, budget {budget / GB:.1f} of {args.hbm:.0f} GB per device; sizes at batch 1{what}")
    print("| devices | ZeRO | recompute | weights GB | grads GB | optimizer+EMA GB | activations GB/sample "
          f"|{extra} total GB (batch 1) | max batch/device | global batch |")  # fmt: skip
    print("|---|---|---|---|---|---|---|" + ("---|" if frozen else "") + "---|---|---|")
    smallest = None
    for devices in (1, 2, 4, 8, 16, 32, 64):
        for stage in stages:
            for recompute in (False, True):
                m = plan(devices, stage, recompute, 1, args.caption, args.lora, targets)
                fixed = m["weights"] + m["grads"] + m["states"] + frozen
                per_sample = m["acts"]
                max_batch = max(0, int((budget - fixed) // per_sample))
                if smallest is None and devices * max_batch >= args.global_batch:
                    smallest = (devices, stage, recompute, max_batch)
                cells = [
                    devices,
                    stage,
                    "yes" if recompute else "no",
                    f"{m['weights'] / GB:.{digits}f}",
                    f"{m['grads'] / GB:.{digits}f}",
                    f"{m['states'] / GB:.{digits}f}",
                    f"{per_sample / GB:.2f}",
                ]
                cells += [f"{frozen / GB:.1f}"] if frozen else []
                cells += [f"{(fixed + per_sample) / GB:.1f}", max_batch, devices * max_batch]
                print("| " + " | ".join(map(str, cells)) + " |")
    if smallest:
        d, s, r, b = smallest
        print(f"\nsmallest setup reaching global batch {args.global_batch} without accumulation: {d} devices, "
              f"ZeRO stage {s}, recompute {'on' if r else 'off'}, {b} samples per device")  # fmt: skip
    if args.batch:
        for recompute in (False, True):
            m = plan(1, 0, recompute, args.batch, args.caption, args.lora, targets)
            total = m["weights"] + m["grads"] + m["states"] + frozen + m["acts"]
            fits = "fits" if total <= budget else "over"
            print(f"batch {args.batch} per device, ZeRO 0, recompute {'on' if recompute else 'off'}: "
                  f"{total / GB:.1f} GB ({fits} the {budget / GB:.1f} GB budget)")  # fmt: skip


if __name__ == "__main__":
    main()
