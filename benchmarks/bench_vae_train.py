"""VAE training-step time: the project's compiled step vs a PyTorch reference step on the same VAE, batch and weights.

    python benchmarks/bench_vae_train.py [--recipe configs/shapes-vae.yaml] [--batch 32] [--repeats 5]

Project: ``training.Trainer.step`` on ``training.vae.VAELoss`` in MindSpore graph mode (encode, posterior sample,
decode, MSE + KL, backward, global-norm clipping, ``nn.AdamWeightDecay``, EMA; one compiled graph), fp32. Reference:
diffusers 0.35.2 ``AutoencoderKL`` in PyTorch eager, the same loss, ``clip_grad_norm_``, ``torch.optim.AdamW`` and an
EMA ``lerp_``. The VAE, resolution, learning rate, clipping and EMA are the recipe's. Each framework runs in its own
process (peak RSS is its own); median of ``repeats`` steps after ``workers.WARMUP`` calls (the first includes
compilation, reported separately). The first step's loss is compared as a sanity check.
"""

import argparse
import json
import os
import platform
import subprocess
import sys

import numpy as np
from bench_train import time_steps  # the same timing protocol as the Next-DiT step
from workers import worker_env


def initial_state(vae_config) -> dict:
    """The project's initialisation of the VAE under a fixed seed, as numpy: both workers (separate processes) start
    from it."""
    import mindspore as ms

    from mindone_lumina.models.vae import AutoencoderKL

    ms.set_seed(0)
    return {p.name: p.asnumpy() for p in AutoencoderKL(vae_config).get_parameters()}


def batch(cfg):
    rng = np.random.default_rng(1)
    f, side = cfg.vae_config.downsample_factor, cfg.resolution
    x = rng.uniform(-1.0, 1.0, (cfg.batch_size, 3, side, side)).astype(np.float32)
    eps = rng.standard_normal((cfg.batch_size, cfg.vae_config.latent_channels, side // f, side // f), dtype=np.float32)
    return x, eps


def project_step(cfg, conv: str = "auto"):
    import mindspore as ms
    from mindspore import Tensor

    from mindone_lumina import backend, training
    from mindone_lumina.models.vae import AutoencoderKL
    from mindone_lumina.training.vae import VAELoss
    from mindone_lumina.weights.load import load_state_dict

    if conv != "auto":
        os.environ["MINDONE_LUMINA_CONV"] = conv
    backend.set_device("CPU", convolutions=True)  # what tools/train_vae.py does
    ms.set_context(mode=ms.GRAPH_MODE)
    model = AutoencoderKL(cfg.vae_config)
    load_state_dict(model, initial_state(cfg.vae_config))
    trainer = training.Trainer(VAELoss(model, cfg.kl_weight), cfg)
    args = tuple(Tensor(a) for a in batch(cfg))
    lr = ms.Tensor(cfg.lr, ms.float32)
    return lambda: float(trainer.step(lr, *args)[0].asnumpy())


def torch_step(cfg):
    import torch
    from diffusers import AutoencoderKL

    vc = cfg.vae_config
    levels = len(vc.block_out_channels)
    ref = AutoencoderKL(
        in_channels=vc.in_channels, out_channels=vc.out_channels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=vc.block_out_channels,
        layers_per_block=vc.layers_per_block, latent_channels=vc.latent_channels, norm_num_groups=vc.norm_num_groups,
        mid_block_add_attention=vc.mid_block_add_attention, use_quant_conv=vc.use_quant_conv,
        use_post_quant_conv=vc.use_post_quant_conv,
    ).train()  # fmt: skip
    state = initial_state(vc)  # the project's names are diffusers' (components.load_vae renames nothing)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = [p.detach().clone() for p in params]
    x, eps = (torch.from_numpy(a) for a in batch(cfg))

    def step():
        posterior = ref.encode(x).latent_dist
        rec = ref.decode(posterior.mean + posterior.std * eps).sample
        loss = ((rec - x) ** 2).mean() + cfg.kl_weight * posterior.kl().sum() / x.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - cfg.ema_decay)
        return float(loss)

    return step


def load_recipe(args):
    from mindone_lumina.training.vae import VAETrainConfig

    return VAETrainConfig.from_yaml(args.recipe, batch_size=args.batch, output="-", data="-")


def worker(kind: str, args) -> dict:
    cfg = load_recipe(args)
    result = time_steps(torch_step(cfg) if kind == "torch" else project_step(cfg, args.conv), args.repeats)
    if kind == "torch":
        import torch

        result["threads"] = torch.get_num_threads()  # the worker's own, reported in the table's header
    return result


def run_worker(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--recipe", args.recipe, "--repeats", str(args.repeats)]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    cmd += ["--conv", args.conv]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=worker_env()).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="configs/shapes-vae.yaml")
    p.add_argument("--batch", type=int, default=None, help="default: the recipe's batch_size")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--conv", choices=("auto", "onednn", "framework", "taps"), default="auto",
        help="MindSpore's convolution kernel (sets MINDONE_LUMINA_CONV; default: auto, as tools/train_vae.py chooses; "
        "framework caps oneDNN at AVX2, taps keeps AVX-512)",
    )  # fmt: skip
    p.add_argument("--worker", choices=["torch", "fp32"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    import torch

    import mindspore as ms

    cfg = load_recipe(args)
    r = {kind: run_worker(kind, args) for kind in ("torch", "fp32")}
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__} ({r['torch']['threads']} "
          f"threads), mindspore {ms.__version__}; {args.recipe}: VAE {cfg.vae}, batch {cfg.batch_size} x "
          f"{cfg.resolution}x{cfg.resolution} px, median of {args.repeats} steps, each in its own process")  # fmt: skip
    print("| step | PyTorch eager (diffusers + AdamW) | MindSpore graph fp32 |")
    print("|---|---|---|")
    t = {k: v["median"] for k, v in r.items()}
    print(f"| seconds / step | {t['torch']:.3f} | {t['fp32']:.3f} |")
    print(f"| ratio to PyTorch | 1 | {t['fp32'] / t['torch']:.2f} |")
    for label, key, fmt in (("first step s (compile)", "first", ".1f"), ("peak RSS MB", "peak_mb", ".0f")):
        print(f"| {label} | " + " | ".join(format(r[k][key], fmt) for k in ("torch", "fp32")) + " |")
    rel = abs(r["fp32"]["loss0"] - r["torch"]["loss0"]) / abs(r["torch"]["loss0"])
    print(f"| first-step loss | {r['torch']['loss0']:.6f} | {r['fp32']['loss0']:.6f} (rel {rel:.1e}) |")


if __name__ == "__main__":
    main()
