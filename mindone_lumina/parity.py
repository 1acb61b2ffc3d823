"""Parity report: where, and by how much, the MindSpore port departs from the PyTorch reference.

The same diffusers-layout weights are loaded into the project's components (``pipeline.TextToImagePipeline``) and into
diffusers 0.35.2 ``LuminaPipeline`` (transformers 4.57.1 Gemma), and compared on the same inputs:

* Next-DiT: the output of every block (torch forward hooks on ``transformer.layers[i]``; ``BlockTrace`` here);
* Gemma: ``hidden_states[-2]`` on the valid (unpadded) caption positions;
* VAE: ``decode`` of one latent;
* sampling: the latent after every Euler step of a fixed prompt and noise (diffusers' grid and RoPE settings).

Every (dtype, mode) pair of the MindSpore side is compared against the fp32 reference. Errors are the relative
Frobenius norm ``||ms - ref|| / ||ref||`` (budgeted) and the max-abs difference (reported). torch is imported lazily:
the reference is an optional dependency of the package.
"""

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Tensor, mint, nn

from . import backend, components
from .dtypes import ms_dtype
from .models import nextdit
from .pipeline import SampleSettings, TextToImagePipeline
from .text.tokenizers import train_tokenizer
from .tolerances import BUDGETS

MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
DTYPES = ("fp32", "fp16")
COMPONENTS = ("block", "gemma", "vae", "step")

# each row's budget in tolerances.BUDGETS
BUDGET_OF = {"block": "transformer", "gemma": "text_encoder", "vae": "vae", "step": "sampling"}

PROMPTS = ["a small red circle in the top left", "a large green square on a white background"]
TOKENIZER_TEXTS = PROMPTS + [
    "ein kleiner roter Kreis auf blauem Hintergrund",
    "a happy dog under the sun",
]


@dataclass(frozen=True)
class Probe:
    """The fixed inputs of a report: image size in pixels, Euler steps (grid points - 1), guidance, seed."""

    height: int = 64
    width: int = 96
    steps: int = 6
    guidance_scale: float = 4.0
    seed: int = 0


@dataclass(frozen=True)
class Row:
    dtype: str
    mode: str
    component: str  # one of COMPONENTS
    index: int  # block or step number; 0 for gemma / vae
    rel: float
    max_abs: float
    budget: float

    @property
    def passed(self) -> bool:
        return bool(self.rel <= self.budget)  # NaN fails


@dataclass
class Report:
    rows: list
    model: str

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def first_failure(self, component: str, dtype: str | None = None, mode: str | None = None):
        """Index of the first failing row of ``component`` (e.g. the first diverging block), or None."""
        for r in self.select(component, dtype, mode):
            if not r.passed:
                return r.index
        return None

    def select(self, component: str, dtype: str | None = None, mode: str | None = None) -> list:
        return [
            r for r in self.rows if r.component == component and dtype in (None, r.dtype) and mode in (None, r.mode)
        ]


def errors(actual, reference) -> tuple:
    """(relative Frobenius error, max-abs error) in float64."""
    a, ref = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    if a.shape != ref.shape:
        raise ValueError(f"shape mismatch: MindSpore {a.shape} vs reference {ref.shape}")
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref)), float(np.abs(a - ref).max())


# ------------------------------------------------------------------------------------------------------------------
# MindSpore side
# ------------------------------------------------------------------------------------------------------------------
class BlockTrace(nn.Cell):
    """``NextDiT`` up to its last block, returning every block's output: (n_layers, B, L, dim). Same inputs as
    ``NextDiT.construct``; works in graph mode and PyNative. Does not rename the model's parameters."""

    def __init__(self, model: nextdit.NextDiT):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, x, t, cap_feats, cap_mask, rope_cos, rope_sin, attn_gain):
        h, c_emb, y_mask = self.model.embed(x, t, cap_feats, cap_mask)  # (B, L, dim), (B, cond), (B, Lc)
        outs = []
        for layer in self.model.layers:
            h = layer(h, rope_cos, rope_sin, attn_gain, cap_feats, y_mask, c_emb)
            outs.append(h[None])  # (1, B, L, dim)
        return mint.cat(outs, dim=0)  # (n_layers, B, L, dim); mint.stack has no CPU kernel in graph mode


def _block_inputs(cfg, probe: Probe, batch: int = 2, cap_len: int = 7):
    """Random (x, t, cap_feats, cap_mask) with padded caption rows, as numpy."""
    rng = np.random.default_rng(probe.seed + 1)
    x = rng.standard_normal((batch, cfg.in_channels, probe.height // 8, probe.width // 8)).astype(np.float32)
    t = rng.uniform(0, 1, batch).astype(np.float32)
    cap = rng.standard_normal((batch, cap_len, cfg.cap_feat_dim)).astype(np.float32)
    mask = np.ones((batch, cap_len), np.int32)
    mask[0, 4:] = 0
    return x, t, cap, mask


def _ms_blocks(ours: TextToImagePipeline, x, t, cap, mask) -> np.ndarray:
    model = ours.transformer
    dt = model.x_embedder.weight.dtype
    cos, sin, gain = nextdit.rope_inputs(model.cfg, x.shape[2], x.shape[3], float(t[0]))
    out = BlockTrace(model)(Tensor(x).astype(dt), Tensor(t), Tensor(cap).astype(dt), Tensor(mask), cos, sin, gain)
    return out.astype(ms.float32).asnumpy()  # (n_layers, B, L, dim)


def _ms_gemma(ours: TextToImagePipeline) -> tuple:
    feats, mask = ours.encode_prompts(PROMPTS, "")
    return feats.astype(ms.float32).asnumpy(), mask.asnumpy()  # (2B, Lc, hidden), (2B, Lc)


def _ms_trajectory(ours: TextToImagePipeline, noise, grid, probe: Probe) -> np.ndarray:
    settings = SampleSettings(height=probe.height, width=probe.width, solver="euler",
                              guidance_scale=probe.guidance_scale, scaling="always", scale_watershed=1.0)  # fmt: skip
    steps = []
    ours(PROMPTS, "", latents=noise, grid=grid, settings=settings, progress=False,
         callback=lambda i, t, x: steps.append(x.astype(ms.float32).asnumpy()))  # fmt: skip
    return np.stack(steps)  # (steps, B, C, h, w)


# ------------------------------------------------------------------------------------------------------------------
# PyTorch reference side (fp32)
# ------------------------------------------------------------------------------------------------------------------
def _torch_blocks(pipe, x, t, cap, mask) -> np.ndarray:
    import torch
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    transformer = pipe.transformer
    outs = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: outs.append(out.float().numpy()))
             for block in transformer.layers]  # fmt: skip
    rope = get_2d_rotary_pos_embed_lumina(transformer.head_dim, 384, 384)
    try:
        with torch.no_grad():
            transformer(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cap), torch.from_numpy(mask), rope,
                        cross_attention_kwargs={}, return_dict=False)  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    return np.stack(outs)  # (n_layers, B, L, dim)


def _torch_gemma(pipe) -> tuple:
    import torch

    tokens = pipe.tokenizer(PROMPTS + [""] * len(PROMPTS), padding=True, pad_to_multiple_of=8, max_length=256,
                            truncation=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        out = pipe.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
    return out.hidden_states[-2].numpy(), tokens.attention_mask.numpy()


def _torch_trajectory(pipe, noise, probe: Probe) -> tuple:
    """Every step's latent of diffusers' LuminaPipeline and its grid in Lumina time (0 noise, 1 data)."""
    import torch

    steps = []

    def on_step(_pipe, _i, _t, kwargs):
        steps.append(kwargs["latents"].float().numpy())
        return {}

    with torch.no_grad():
        pipe(prompt=PROMPTS, negative_prompt="", height=probe.height, width=probe.width,
             num_inference_steps=probe.steps, guidance_scale=probe.guidance_scale, clean_caption=False,
             latents=torch.from_numpy(noise), output_type="latent", return_dict=False,
             callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"])  # fmt: skip
    grid = 1.0 - pipe.scheduler.sigmas.double().numpy()
    return np.stack(steps), grid  # (steps, B, C, h, w), (steps + 1,)


# ------------------------------------------------------------------------------------------------------------------
# Tiny random model (the default): Gemma 32 wide x 3 layers, Next-DiT 32 wide x 4 blocks, 8x VAE 32 channels
# ------------------------------------------------------------------------------------------------------------------
def build_tiny_model(folder: str, seed: int = 0, num_layers: int = 4, texts=None, tied_queries: bool = True) -> str:
    """Save a tiny random diffusers ``LuminaPipeline`` under ``folder/pipe`` and return that folder. Every Gemma and
    Next-DiT parameter is random (norm scales near 1), so the zero-initialised gates and adaLN layers take part. The
    BPE tokenizer is trained on ``texts`` (default: the report's prompts). ``tied_queries``: attn2's query copies
    attn1's, as in the released (converted) checkpoints; False leaves them different, as diffusers trains them."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline
    from transformers import GemmaConfig, GemmaModel, GemmaTokenizerFast

    torch.manual_seed(seed)
    tok_dir = os.path.join(folder, "tokenizer-src")
    train_tokenizer(TOKENIZER_TEXTS if texts is None else texts, 300).save_pretrained(tok_dir)
    tokenizer = GemmaTokenizerFast.from_pretrained(tok_dir)
    tokenizer.padding_side = "right"
    gemma_cfg = GemmaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, pad_token_id=0, bos_token_id=2,
        eos_token_id=1,
    )  # fmt: skip
    text_encoder = randomize_torch_(GemmaModel(gemma_cfg).eval(), seed + 1, std=0.3)
    transformer = LuminaNextDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=num_layers, num_attention_heads=2,
        num_kv_heads=1, multiple_of=16, learn_sigma=True, qk_norm=True, cross_attention_dim=32,
    ).eval()  # fmt: skip
    randomize_torch_(transformer, seed + 2, std=0.1)
    with torch.no_grad():
        for block in transformer.layers if tied_queries else ():
            block.attn2.to_q.weight.copy_(block.attn1.to_q.weight)
            block.attn2.norm_q.load_state_dict(block.attn1.norm_q.state_dict())
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=64, scaling_factor=0.13025,
    ).eval()  # fmt: skip
    pipe = LuminaPipeline(transformer, FlowMatchEulerDiscreteScheduler(), vae, text_encoder, tokenizer)
    out = os.path.join(folder, "pipe")
    pipe.save_pretrained(out)
    return out


def randomize_torch_(module, seed: int = 0, std: float = 0.1):
    """Give every parameter of a torch module a random value in place (norm scales around 1, the rest around 0), so
    that zero-initialised gates, adaLN and output layers take part in a comparison."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            is_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_((1.0 + 0.1 * noise) if is_scale else std * noise)
    return module


def load_reference(folder: str):
    """diffusers ``LuminaPipeline`` in fp32 on CPU, right-padding tokenizer, no progress bar."""
    from diffusers import LuminaPipeline

    pipe = LuminaPipeline.from_pretrained(folder)
    pipe.tokenizer.padding_side = "right"
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------------------------
def run(model: str | None, dtypes=DTYPES, modes=tuple(MODES), out: str = "parity-report", probe=Probe(),
        perturb=None) -> Report:  # fmt: skip
    """Compare every (dtype, mode) pair, write ``out/report.md`` and the plots, return the rows.

    Args:
        model: a diffusers-layout folder (``model_index.json``), or None for a tiny random model built in ``out``.
        dtypes / modes: subsets of ``DTYPES`` / ``MODES``.
        out: output folder (created).
        probe: the fixed inputs.
        perturb: ``perturb(pipeline)`` applied to every MindSpore pipeline after loading (fault injection).
    """
    unknown = sorted(set(dtypes) - set(DTYPES)) + sorted(set(modes) - set(MODES))
    if unknown or not dtypes or not modes:
        raise ValueError(f"unknown or empty dtypes/modes {unknown}; valid dtypes {DTYPES}, modes {tuple(MODES)}")
    if model is not None and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise ValueError(f"{model} is not a diffusers-layout folder (no model_index.json)")
    os.makedirs(out, exist_ok=True)  # after the checks: a refused run leaves no folder behind
    if model is None:
        model = build_tiny_model(out)
    pipe = load_reference(model)
    ref, grid = _reference_outputs(pipe, probe)
    rows = []
    previous = ms.get_context("mode")
    try:
        for dtype in dtypes:
            backend.check_dtype_supported(ms_dtype(dtype))
            for mode in modes:
                ms.set_context(mode=MODES[mode])
                ours = TextToImagePipeline.from_pretrained(model, dtype=dtype)
                ours.vae = components.load_vae(os.path.join(model, "vae"), ms_dtype(dtype))
                if perturb is not None:
                    perturb(ours)
                rows += _compare(ours, ref, grid, probe, dtype, mode)
    finally:
        ms.set_context(mode=previous)
    report = Report(rows, model)
    write_markdown(report, probe, out)
    plot(report, out)
    return report


def _reference_outputs(pipe, probe: Probe) -> tuple:
    import torch

    cfg = nextdit.NextDiTConfig(
        patch_size=pipe.transformer.config.patch_size, in_channels=pipe.transformer.config.in_channels,
        cap_feat_dim=pipe.transformer.config.cross_attention_dim,
    )  # fmt: skip
    block_inputs = _block_inputs(cfg, probe)
    rng = np.random.default_rng(probe.seed)
    c = pipe.vae.config.latent_channels
    noise = rng.standard_normal((len(PROMPTS), c, probe.height // 8, probe.width // 8)).astype(np.float32)
    latent = rng.standard_normal((1, c, probe.height // 8, probe.width // 8)).astype(np.float32)
    with torch.no_grad():
        decoded = pipe.vae.decode(torch.from_numpy(latent)).sample.numpy()
    steps, grid = _torch_trajectory(pipe, noise, probe)
    ref = {
        "block_inputs": block_inputs,
        "block": _torch_blocks(pipe, *block_inputs),
        "gemma": _torch_gemma(pipe),
        "latent": latent,
        "vae": decoded,
        "noise": noise,
        "step": steps,
    }
    return ref, grid


def _compare(ours, ref, grid, probe: Probe, dtype: str, mode: str) -> list:
    budget = {row: BUDGETS[dtype][part] for row, part in BUDGET_OF.items()}
    rows = []
    for i, (a, r) in enumerate(zip(_ms_blocks(ours, *ref["block_inputs"]), ref["block"])):
        rows.append(Row(dtype, mode, "block", i, *errors(a, r), budget["block"]))
    feats, mask = _ms_gemma(ours)
    ref_feats, ref_mask = ref["gemma"]
    if not np.array_equal(mask, ref_mask):
        raise ValueError("the tokenizers of the two sides disagree on the caption mask")
    valid = mask.astype(bool)  # (2B, Lc): compare real tokens only
    rows.append(Row(dtype, mode, "gemma", 0, *errors(feats[valid], ref_feats[valid]), budget["gemma"]))
    decoded = ours.vae.decode(Tensor(ref["latent"])).astype(ms.float32).asnumpy()
    rows.append(Row(dtype, mode, "vae", 0, *errors(decoded, ref["vae"]), budget["vae"]))
    for i, (a, r) in enumerate(zip(_ms_trajectory(ours, ref["noise"], grid, probe), ref["step"])):
        rows.append(Row(dtype, mode, "step", i, *errors(a, r), budget["step"]))
    return rows


def write_markdown(report: Report, probe: Probe, out: str) -> str:
    """``out/report.md``: one table per component, a row per (dtype, mode, index)."""
    titles = {"block": "Next-DiT output after every block", "gemma": "Gemma features (hidden_states[-2], valid tokens)",
              "vae": "VAE decode", "step": "Sampling trajectory (latent after every Euler step)"}  # fmt: skip
    lines = [
        "# Parity report: MindSpore vs PyTorch reference",
        "",
        f"Model: `{report.model}`. Reference: diffusers / transformers in fp32. Probe: "
        f"`{json.dumps(dataclasses.asdict(probe))}`, prompts {PROMPTS}.",
        "Errors: relative Frobenius `||ms - ref|| / ||ref||` (checked against the budget) and max-abs.",
        "",
        f"**Overall: {'PASS' if report.passed else 'FAIL'}**",
    ]
    for comp in COMPONENTS:
        lines += ["", f"## {titles[comp]}", "", "| dtype | mode | index | rel. Frobenius | max abs | budget | result |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in report.select(comp):
            lines.append(f"| {r.dtype} | {r.mode} | {r.index} | {r.rel:.3e} | {r.max_abs:.3e} | {r.budget:.2g} | "
                         f"{'PASS' if r.passed else 'FAIL'} |")  # fmt: skip
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def plot(report: Report, out: str) -> list:
    """``errors_blocks.png`` and ``errors_steps.png``: relative error (log scale) per index, a line per dtype/mode,
    the budgets dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for comp, name, xlabel in (("block", "errors_blocks.png", "Next-DiT block"),
                               ("step", "errors_steps.png", "sampling step")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6, 4))
        for dtype in sorted({r.dtype for r in report.rows}):
            for mode in sorted({r.mode for r in report.rows}):
                rows = report.select(comp, dtype, mode)
                if rows:
                    ax.plot([r.index for r in rows], [max(r.rel, 1e-12) for r in rows], marker="o",
                            label=f"{dtype} {mode}")  # fmt: skip
            ax.axhline(BUDGETS[dtype][BUDGET_OF[comp]], linestyle="--", color="gray", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("relative Frobenius error")
        ax.set_title(f"MindSpore vs PyTorch: error per {xlabel} (dashed: budgets)")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
