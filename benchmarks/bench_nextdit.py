"""Next-DiT forward latency: MindSpore graph mode, PyNative and PyTorch eager (diffusers 0.35.2), same inputs.

    python benchmarks/bench_nextdit.py [--tokens 256 1024 4096] [--repeats 5]

fp32, hidden 768 / 12 layers / 12 heads / 4 kv heads, batch 1, 128-token caption. Reports the median of ``repeats``
timed calls after ``workers.WARMUP`` calls (the first call, graph compilation included, separately; why so many:
workers.py), achieved GFLOP/s and its share of a fp32 matmul peak measured in the same run for each framework, the
MindSpore / PyTorch time ratio and each framework's peak RSS (every framework and mode runs in its own process).
"""

import argparse
import json
import platform
import resource
import subprocess
import sys

import numpy as np
import torch
from diffusers import LuminaNextDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
from workers import timed, worker_env

import mindspore as ms
from mindspore import Tensor, mint

from mindone_lumina import backend
from mindone_lumina.models import nextdit
from mindone_lumina.weights.load import load_state_dict, param_shapes
from mindone_lumina.weights.nextdit import DIFFUSERS_RULES
from mindone_lumina.weights.rules import convert_tensors, export_tensors
from mindone_lumina.weights.tensors import ArrayCheckpoint

CFG = nextdit.NextDiTConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, qk_norm=True, cap_feat_dim=2048)
CAPTION = 128


def forward_flops(cfg: nextdit.NextDiTConfig, seq: int, cap: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of the linears and attention matmuls; norms and elementwise ops excluded."""
    d, kv, f, y = cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_hidden, cfg.cap_feat_dim
    per_block = seq * (2 * d * d + 2 * d * kv + 3 * d * f) + cap * 2 * y * kv  # projections and FFN
    per_block += 2 * seq * seq * d + 2 * seq * cap * d  # QK^T and PV for self and cross attention
    return 2.0 * cfg.n_layers * per_block


def matmul_peak(repeats=5, n=2048):
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    ta, ma = torch.from_numpy(a), Tensor(a)
    _, _, t_torch = timed(lambda: torch.mm(ta, ta), repeats)
    _, _, t_ms = timed(lambda: mint.matmul(ma, ma).asnumpy(), repeats)
    flops = 2.0 * n**3
    return flops / t_torch / 1e9, flops / t_ms / 1e9


def build(framework: str):
    """The benchmark model with the same seeded weights in either framework."""
    model = nextdit.NextDiT(CFG)
    rng = np.random.default_rng(0)
    state = {q.name: (0.02 * rng.standard_normal(q.shape)).astype(np.float32) for q in model.get_parameters()}
    if framework != "torch":
        load_state_dict(model, state)
        return model
    ref = LuminaNextDiT2DModel(
        sample_size=128, patch_size=2, in_channels=4, hidden_size=CFG.dim, num_layers=CFG.n_layers,
        num_attention_heads=CFG.n_heads, num_kv_heads=CFG.n_kv_heads, multiple_of=CFG.multiple_of,
        learn_sigma=True, qk_norm=True, cross_attention_dim=CFG.cap_feat_dim,
    ).eval()  # fmt: skip
    specs = convert_tensors(ArrayCheckpoint(state), None, param_shapes(model))
    exported = {s.name: torch.from_numpy(s.fetch()) for s in export_tensors(specs, DIFFUSERS_RULES)}
    ref.load_state_dict(exported, strict=True)
    return ref


def inputs(seq: int):
    rng = np.random.default_rng(1)
    side = int(round(seq**0.5)) * 2  # square latent with seq tokens at patch 2
    x = rng.standard_normal((1, 4, side, side)).astype(np.float32)
    cap = rng.standard_normal((1, CAPTION, CFG.cap_feat_dim)).astype(np.float32)
    mask = np.ones((1, CAPTION), np.int32)
    mask[:, 100:] = 0  # a padded caption
    return x, np.array([0.5], np.float32), cap, mask


def worker(framework: str, seq: int, repeats: int) -> dict:
    """One framework / mode in its own process, so peak RSS is its own."""
    backend.set_device("CPU")  # what the tools do
    torch.set_grad_enabled(False)
    model = build(framework)
    arrays = inputs(seq)
    if framework == "torch":
        rope_table = get_2d_rotary_pos_embed_lumina(CFG.head_dim, 384, 384)
        args = [torch.from_numpy(a) for a in arrays]
        _, first, median = timed(
            lambda: model(*args, rope_table, cross_attention_kwargs={}, return_dict=False), repeats
        )
    else:
        ms.set_context(mode=ms.GRAPH_MODE if framework == "graph" else ms.PYNATIVE_MODE)
        args = [Tensor(a) for a in arrays]
        _, first, median = timed(lambda: nextdit.forward(model, *args).asnumpy(), repeats)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"first": first, "median": median, "peak_mb": peak_mb, "torch_threads": torch.get_num_threads()}


def run_worker(framework: str, seq: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--tokens", str(seq), "--repeats", str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=worker_env()).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker", choices=["torch", "graph", "pynative"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens[0], args.repeats)))
        return
    backend.set_device("CPU")  # what the tools do
    peak_torch, peak_ms = matmul_peak()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), mindspore {ms.__version__}; fp32 matmul peak: torch {peak_torch:.1f} GFLOP/s, "
          f"mindspore {peak_ms:.1f} GFLOP/s; each cell a separate process, median of {args.repeats}")  # fmt: skip
    print(
        "| tokens | GFLOP | PyTorch eager s | MS graph s (compile s) | MS PyNative s | graph/torch | pynative/torch "
        "| torch GFLOP/s (% peak) | graph GFLOP/s (% peak) | peak RSS MB torch / graph / pynative |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seq in args.tokens:
        r = {fw: run_worker(fw, seq, args.repeats) for fw in ("torch", "graph", "pynative")}
        t_torch, t_graph, t_py = r["torch"]["median"], r["graph"]["median"], r["pynative"]["median"]
        flops = forward_flops(CFG, seq, CAPTION)
        gf_torch, gf_graph = flops / t_torch / 1e9, flops / t_graph / 1e9
        print(
            f"| {seq} | {flops / 1e9:.0f} | {t_torch:.3f} | {t_graph:.3f} ({r['graph']['first'] - t_graph:.1f}) "
            f"| {t_py:.3f} | {t_graph / t_torch:.2f} | {t_py / t_torch:.2f} "
            f"| {gf_torch:.0f} ({100 * gf_torch / peak_torch:.0f}%) | {gf_graph:.0f} ({100 * gf_graph / peak_ms:.0f}%) "
            f"| {r['torch']['peak_mb']:.0f} / {r['graph']['peak_mb']:.0f} / {r['pynative']['peak_mb']:.0f} |",
            flush=True,
        )
        print(f"# ({seq} tokens: the torch worker ran {r['torch']['torch_threads']} threads)", flush=True)


if __name__ == "__main__":
    main()
