"""Per-device training memory of nextdit-2b-gqa at 1024^2 on 64 GB Ascend 910B devices, by ZeRO stage and device
count, with and without per-block recompute: the largest per-device batch that fits, and the smallest setup that
reaches a global batch without gradient accumulation (512: the Lumina-T2I recipe's global batch).

    python benchmarks/memory_plan.py [--global-batch 512] [--caption 256] [--hbm 64] [--features cached|online]

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
  per-sample activations of training), so they add nothing to the peak. ``cached`` streams features from a store.
"""

import argparse

from mindone_lumina.models.nextdit import PRESETS

GB = 1024**3
FROZEN_PARAMS = 2_506_172_416 + 34_163_592  # Gemma-2B; the SDXL-VAE encoder and quant_conv (features: online)


def plan(devices: int, stage: int, recompute: bool, batch: int, caption: int):
    cfg = PRESETS["nextdit-2b-gqa"]
    p = cfg.num_parameters()
    weights = 2 * p / (devices if stage >= 3 else 1)
    grads = 2 * p / (devices if stage >= 2 else 1)
    states = (12 + 4) * p / (devices if stage >= 1 else 1)  # master + m + v, and the EMA
    tokens = (1024 // 16) ** 2  # 4096 image tokens at 1024^2 (VAE /8, patch 2)
    kv = cfg.kv_heads * cfg.head_dim
    per_block = 2 * (16 * tokens * cfg.dim + 4 * tokens * cfg.ffn_hidden + 2 * caption * kv) + 8 * tokens * cfg.n_heads
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
    args = ap.parse_args()
    budget = 0.9 * args.hbm * GB
    frozen = 2 * FROZEN_PARAMS if args.features == "online" else 0
    extra = " frozen encoders GB |" if frozen else ""
    print(f"# nextdit-2b-gqa, 1024^2, budget {budget / GB:.1f} of {args.hbm:.0f} GB per device; sizes at batch 1")
    print("| devices | ZeRO | recompute | weights GB | grads GB | optimizer+EMA GB | activations GB/sample "
          f"|{extra} total GB (batch 1) | max batch/device | global batch |")  # fmt: skip
    print("|---|---|---|---|---|---|---|" + ("---|" if frozen else "") + "---|---|---|")
    smallest = None
    for devices in (1, 2, 4, 8, 16, 32, 64):
        for stage in (0, 1, 2, 3):
            for recompute in (False, True):
                m = plan(devices, stage, recompute, 1, args.caption)
                fixed = m["weights"] + m["grads"] + m["states"] + frozen
                per_sample = m["acts"]
                max_batch = max(0, int((budget - fixed) // per_sample))
                if smallest is None and devices * max_batch >= args.global_batch:
                    smallest = (devices, stage, recompute, max_batch)
                cells = [
                    devices,
                    stage,
                    "yes" if recompute else "no",
                    f"{m['weights'] / GB:.1f}",
                    f"{m['grads'] / GB:.1f}",
                    f"{m['states'] / GB:.1f}",
                    f"{per_sample / GB:.2f}",
                ]
                cells += [f"{frozen / GB:.1f}"] if frozen else []
                cells += [f"{(fixed + per_sample) / GB:.1f}", max_batch, devices * max_batch]
                print("| " + " | ".join(map(str, cells)) + " |")
    if smallest:
        d, s, r, b = smallest
        print(f"\nsmallest setup reaching global batch {args.global_batch} without accumulation: {d} devices, "
              f"ZeRO stage {s}, recompute {'on' if r else 'off'}, {b} samples per device")  # fmt: skip


if __name__ == "__main__":
    main()
