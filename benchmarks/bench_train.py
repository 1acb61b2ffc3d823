"""Training-step time: the project's compiled step vs a PyTorch reference step on the same config, batch and weights.

    python benchmarks/bench_train.py [--batch 4] [--tokens 256] [--repeats 5]
    python benchmarks/bench_train.py --model default --batch 32 --tokens 64 --repeats 10   # the default model's size
    python benchmarks/bench_train.py --model default --batch 32 --tokens 64 --repeats 10 --lora 16   # LoRA vs full

Project: ``training.Trainer.step`` in MindSpore graph mode (velocity loss, backward, global-norm clipping,
``nn.AdamWeightDecay``, EMA; one compiled graph), fp32 and fp16 compute. Reference: diffusers 0.35.2
``LuminaNextDiT2DModel`` in PyTorch eager, the same loss, ``clip_grad_norm_``, ``torch.optim.AdamW`` and an EMA
``lerp_``. ``--model bench``: hidden 384 / 6 layers / 6 heads / 2 kv heads, patch 2, learned sigma, 4 latent
channels, 128-token captions of width 256; ``--model default``: the bundled default model's shape (hidden 128 / 5
layers / 4 heads / 2 kv heads, patch 1, 16-token captions of width 64). Each
framework runs in its own process (peak RSS is its own); median of ``repeats`` steps after ``workers.WARMUP`` calls
(the first includes compilation, reported separately). The first step's loss is compared as a sanity check.

``--lora R``: full fine-tuning against a rank-R LoRA (``models.lora``, attention + feed-forward, alpha = R) of the
same model and batch, fp32, in both frameworks (the reference: peft 0.21.2 on the diffusers model, AdamW over the
adapter only), and the adapter's file size (peft's ``adapter_model.safetensors``, fp32) against the model's.
"""

import argparse
import json
import platform
import resource
import subprocess
import sys

import numpy as np
from workers import timed, worker_env

MODELS = {  # name -> (Next-DiT config, caption tokens)
    "bench": ({"dim": 384, "n_layers": 6, "n_heads": 6, "n_kv_heads": 2, "qk_norm": True, "cap_feat_dim": 256,
               "in_channels": 4, "learn_sigma": True}, 128),
    "default": ({"dim": 128, "n_layers": 5, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 64, "qk_norm": True,
                 "cap_feat_dim": 64, "in_channels": 4, "patch_size": 1, "learn_sigma": False}, 16),
}  # fmt: skip
CONFIG, CAPTION = MODELS["bench"]  # main() sets the --model's
LR, CLIP, EMA = 1e-4, 1.0, 0.999


def random_state(model) -> dict:
    rng = np.random.default_rng(0)
    return {p.name: (0.02 * rng.standard_normal(p.shape)).astype(np.float32) for p in model.get_parameters()}


def batch(size: int, tokens: int):
    rng = np.random.default_rng(1)
    side = int(round(tokens**0.5)) * CONFIG.get("patch_size", 2)  # square latent
    x1 = rng.standard_normal((size, 4, side, side)).astype(np.float32)
    x0 = rng.standard_normal((size, 4, side, side)).astype(np.float32)
    t = rng.uniform(0.0, 1.0, size).astype(np.float32)
    cap = rng.standard_normal((size, CAPTION, CONFIG["cap_feat_dim"])).astype(np.float32)
    mask = np.ones((size, CAPTION), np.int32)
    mask[:, 96:] = 0
    return x1, x0, t, cap, mask


def project_step(precision: str, size: int, tokens: int, rank: int = 0):
    import mindspore as ms
    from mindspore import Tensor

    from mindone_lumina import backend, training
    from mindone_lumina.models import nextdit
    from mindone_lumina.weights.load import load_state_dict

    backend.set_device("CPU")  # what tools/train.py does
    ms.set_context(mode=ms.GRAPH_MODE)
    model = nextdit.NextDiT(nextdit.resolve_config(CONFIG))
    load_state_dict(model, random_state(model))
    if rank:
        from mindone_lumina.models import lora

        lora.add_adapter(model, lora.LoRAConfig(rank=rank, alpha=rank))
    cfg = training.TrainConfig(data="-", output="-", lr=LR, grad_clip=CLIP, ema_decay=EMA, precision=precision)
    trainer = training.Trainer(training.FlowMatchingLoss(model), cfg)
    x1, x0, t, cap, mask = batch(size, tokens)
    side = x1.shape[2]
    args = (*map(Tensor, (x1, x0, t, cap, mask)), *nextdit.rope_inputs(model.cfg, side, side, 1.0))
    lr = ms.Tensor(cfg.lr, ms.float32)
    return lambda: float(trainer.step(lr, *args)[0].asnumpy())


def torch_step(size: int, tokens: int, rank: int = 0):
    import torch
    from diffusers import LuminaNextDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    from mindone_lumina.models import nextdit
    from mindone_lumina.weights.load import param_shapes
    from mindone_lumina.weights.nextdit import DIFFUSERS_RULES
    from mindone_lumina.weights.rules import convert_tensors, export_tensors
    from mindone_lumina.weights.tensors import ArrayCheckpoint

    cfg = nextdit.resolve_config(CONFIG)
    ref = LuminaNextDiT2DModel(
        sample_size=64, patch_size=cfg.patch_size, in_channels=4, hidden_size=cfg.dim, num_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_kv_heads=cfg.n_kv_heads, multiple_of=cfg.multiple_of,
        learn_sigma=cfg.learn_sigma, qk_norm=True, cross_attention_dim=cfg.cap_feat_dim,
    ).train()  # fmt: skip
    model = nextdit.NextDiT(cfg)
    specs = convert_tensors(ArrayCheckpoint(random_state(model)), None, param_shapes(model))
    state = {s.name: torch.from_numpy(s.fetch()) for s in export_tensors(specs, DIFFUSERS_RULES)}
    ref.load_state_dict(state, strict=True)
    if rank:  # the project's "attention" and "feed_forward" targets under their diffusers names
        from peft import LoraConfig, get_peft_model

        targets = [
            "attn1.to_q",
            "attn1.to_k",
            "attn1.to_v",
            "attn2.to_q",
            "attn2.to_k",
            "attn2.to_v",
            "attn2.to_out.0",
            "feed_forward.linear_1",
            "feed_forward.linear_2",
            "feed_forward.linear_3",
        ]
        ref = get_peft_model(ref, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))  # fmt: skip
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    x1, x0, t, cap, mask = (torch.from_numpy(a) for a in batch(size, tokens))
    rope = get_2d_rotary_pos_embed_lumina(ref.head_dim, 384, 384)

    def step():
        tt = t[:, None, None, None]
        v = ref(tt * x1 + (1 - tt) * x0, t, cap, mask, rope, cross_attention_kwargs={}, return_dict=False)[0]
        loss = ((v[:, :4] - (x1 - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - EMA)
        return float(loss)

    return step


def time_steps(step, repeats: int) -> dict:
    """``workers.timed`` of the step (first call with compilation, median after ``WARMUP`` calls), the first call's
    loss and this process's peak RSS."""
    loss0, first, median = timed(step, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"first": first, "median": median, "loss0": loss0, "peak_mb": peak}


def worker(kind: str, size: int, tokens: int, repeats: int, rank: int = 0) -> dict:
    step = torch_step(size, tokens, rank) if kind == "torch" else project_step(kind, size, tokens, rank)
    result = time_steps(step, repeats)
    if kind == "torch":
        import torch

        result["threads"] = torch.get_num_threads()  # the worker's own, reported in the table's header
    return result


def run_worker(kind: str, args, rank: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--batch", str(args.batch), "--tokens", str(args.tokens),
           "--repeats", str(args.repeats), "--model", args.model, "--worker-rank", str(rank)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=worker_env()).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", choices=sorted(MODELS), default="bench", help="the Next-DiT shape (module docstring)")
    p.add_argument("--lora", type=int, default=0, help="compare full fine-tuning with a LoRA of this rank")
    p.add_argument("--worker", choices=["torch", "fp32", "fp16"], help=argparse.SUPPRESS)
    p.add_argument("--worker-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    global CONFIG, CAPTION
    CONFIG, CAPTION = MODELS[args.model]
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.tokens, args.repeats, args.worker_rank)))
        return
    import torch

    import mindspore as ms

    if args.lora:
        lora_table(args, torch.__version__, ms.__version__)
        return

    r = {kind: run_worker(kind, args) for kind in ("torch", "fp32", "fp16")}
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__} ({r['torch']['threads']} "
          f"threads), mindspore {ms.__version__}; {args.model} model, batch {args.batch} x {args.tokens} tokens, "
          f"median of {args.repeats} steps, each in its own process")  # fmt: skip
    print("| step | PyTorch eager (diffusers + AdamW) | MindSpore graph fp32 | MindSpore graph fp16 |")
    print("|---|---|---|---|")
    t = {k: v["median"] for k, v in r.items()}
    print(f"| seconds / step | {t['torch']:.3f} | {t['fp32']:.3f} | {t['fp16']:.3f} |")
    print(f"| ratio to PyTorch | 1 | {t['fp32'] / t['torch']:.2f} | {t['fp16'] / t['torch']:.2f} |")
    for label, key, fmt in (("first step s (compile)", "first", ".1f"), ("peak RSS MB", "peak_mb", ".0f")):
        print(f"| {label} | " + " | ".join(format(r[k][key], fmt) for k in ("torch", "fp32", "fp16")) + " |")
    rel = abs(r["fp32"]["loss0"] - r["torch"]["loss0"]) / abs(r["torch"]["loss0"])
    print(f"| first-step loss | {r['torch']['loss0']:.6f} | {r['fp32']['loss0']:.6f} (rel {rel:.1e}) "
          f"| {r['fp16']['loss0']:.6f} |")  # fmt: skip


def lora_table(args, torch_version, ms_version) -> None:
    """Full fine-tuning vs LoRA: step time in both frameworks, trained parameters, file sizes."""
    import os
    import tempfile

    from mindone_lumina.io import diffusers_io
    from mindone_lumina.models import lora, nextdit
    from mindone_lumina.weights import lora as lora_files
    from mindone_lumina.weights.load import cell_specs

    runs = {(kind, rank): run_worker(kind, args, rank) for rank in (0, args.lora) for kind in ("torch", "fp32")}
    model = nextdit.NextDiT(nextdit.resolve_config(CONFIG))
    total = sum(int(np.prod(p.shape)) for p in model.get_parameters())
    with tempfile.TemporaryDirectory() as tmp:  # the files people exchange: diffusers transformer, peft adapter
        path = diffusers_io.write_transformer(os.path.join(tmp, "transformer"), cell_specs(model), model.cfg, 64)
        full_mb = os.path.getsize(path) / 1e6
        lora.add_adapter(model, lora.LoRAConfig(rank=args.lora, alpha=args.lora))
        lora_files.save_adapter(model, os.path.join(tmp, "adapter"))
        adapter_mb = os.path.getsize(os.path.join(tmp, "adapter", lora_files.WEIGHTS)) / 1e6
    adapter = sum(int(np.prod(p.shape)) for p in lora.adapter_state(model).values())
    threads = runs[("torch", 0)]["threads"]
    print(f"# {platform.processor() or platform.machine()}, torch {torch_version} ({threads} threads), mindspore "
          f"{ms_version}; {args.model} model, batch {args.batch} x {args.tokens} tokens, median of {args.repeats} "
          f"steps, each in its own process; LoRA rank {args.lora} on attention + feed-forward, fp32")  # fmt: skip
    print("| | full fine-tune | LoRA | LoRA / full |")
    print("|---|---|---|---|")
    for label, kind in (("PyTorch eager s/step (diffusers + peft)", "torch"), ("MindSpore graph s/step", "fp32")):
        full, low = runs[(kind, 0)]["median"], runs[(kind, args.lora)]["median"]
        print(f"| {label} | {full:.3f} | {low:.3f} | {low / full:.2f} |")
    ratio = [runs[("fp32", r)]["median"] / runs[("torch", r)]["median"] for r in (0, args.lora)]
    print(f"| MindSpore / PyTorch | {ratio[0]:.2f} | {ratio[1]:.2f} | |")
    peak = [runs[("fp32", r)]["peak_mb"] for r in (0, args.lora)]
    print(f"| MindSpore peak RSS MB | {peak[0]:.0f} | {peak[1]:.0f} | {peak[1] / peak[0]:.2f} |")
    print(f"| trained parameters | {total:,} | {adapter:,} | {adapter / total:.4f} |")
    print(f"| file MB (fp32; diffusers transformer / peft adapter) | {full_mb:.2f} | {adapter_mb:.2f} | "
          f"{adapter_mb / full_mb:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
