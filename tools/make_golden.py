"""Write the golden bundle (``mindone_lumina/golden.py``) from the PyTorch references on CPU, in fp32.

    python tools/make_golden.py [--out mindone_lumina/assets/golden] [--check]

References: diffusers 0.35.2 (``LuminaNextDiT2DModel``, ``AutoencoderKL``, ``LuminaPipeline``), transformers 4.57.1
(``GemmaModel``), torch 2.13.0; Flag-DiT's weights, inputs and output are those the ORIGINAL Lumina-T2I code produced
(``tests/fixtures/original-flagdit-tiny``, made by ``tests/fixtures/make_fixtures.py``), copied unchanged: that code
is not installable, and the fixture is its output.

Cases (every weight random and seeded, so zero-initialised gates and adaLN layers take part):
- ``nextdit/<case>``: the Next-DiT velocity (learned-sigma channels dropped, as the original) of a model with hidden
  144, 2 heads of 72 with 1 kv head, qk-norm, on a 6x10 latent (3x5 patches) and a 10x14 one (5x7): ``plain``
  (per-sample t, no scaling), ``pi`` and ``ntk`` (time-aware scaled RoPE with factor 2 and watershed 0.5 at t = 0.2
  and 0.8, proportional attention against 16 tokens); captions of 8 tokens, row 1 padded after 5.
- ``flagdit/plain``: the original Flag-DiT forward.
- ``gemma/plain``: ``hidden_states[-2]`` of three prompts and two empty ones (BOS only), right-padded.
- ``vae/plain``: ``decode`` of a 6x10 latent.
- ``sampling/plain``: every latent of 3 Euler steps of ``LuminaPipeline`` (guidance 4, 48x80 px) from fixed noise.
- ``training/plain``: the flow-matching loss and the gradient of every parameter, keyed by the PROJECT's parameter
  names (a tensor diffusers holds twice, the tied query, gets the sum of both copies' gradients).

Deterministic: one torch thread, seeded generators, files without timestamps. ``--check`` regenerates into a temporary
folder and compares with ``--out``: every file bit for bit, except the case arrays, which must have the same keys,
shapes and dtypes and values equal to within ``CHECK_RTOL`` of the largest magnitude of their group (the key without
its last part: a case, or a case's gradients). torch's CPU kernels round differently from one processor to another:
regenerated on an AMD EPYC, the bundle written on an Intel Xeon differed by up to 2.7e-6, in the training gradients.
It exits 1 on any other difference.
"""

import filecmp
import os
import platform
import shutil
import tempfile

import numpy as np

from mindone_lumina import atomic, cli, golden
from mindone_lumina.parity import randomize_torch_
from mindone_lumina.weights.safetensors import SafetensorsFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGDIT_FIXTURE = os.path.join(ROOT, "tests", "fixtures", "original-flagdit-tiny")
PROMPTS = ["a small red circle in the top left", "a large green square on a white background", "a happy dog"]
TEXTS = PROMPTS + ["ein kleiner roter Kreis auf blauem Hintergrund", "the quick brown fox"]
NEXTDIT = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=144, num_layers=2, num_attention_heads=2,
               num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=0.25, learn_sigma=True, qk_norm=True,
               cross_attention_dim=32)  # fmt: skip
GEMMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
             head_dim=8, max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=1)  # fmt: skip
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 16, 16), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
           sample_size=64, scaling_factor=0.13025)  # fmt: skip
# (latent h, latent w, RoPE scale factor, proportional-attention base or None, t of both samples or None = random);
# the time-aware switch: position interpolation (linear factor) while t < WATERSHED, NTK from it
NEXTDIT_CASES = {"plain": (6, 10, 1.0, None, None), "pi": (10, 14, 2.0, 16, 0.2), "ntk": (10, 14, 2.0, 16, 0.8)}
WATERSHED = 0.5
SAMPLING = dict(height=48, width=80, steps=3, guidance_scale=4.0)
CAPTION_LEN, PADDED_FROM = 8, 5
CHECK_RTOL = 1e-5  # --check: a tenth of the tightest fp32 budget in tolerances.py


def parser():
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=golden.SHIPPED, help="bundle folder (replaced whole when written)")
    p.add_argument(
        "--check",
        action="store_true",
        help="regenerate elsewhere and compare with --out (module docstring; default: write --out)",
    )
    return p


def build_pipeline(folder: str):
    """The tiny diffusers ``LuminaPipeline`` saved into ``folder``; returns it (fp32, eval, right padding)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline
    from transformers import GemmaConfig, GemmaModel, GemmaTokenizerFast

    from mindone_lumina.text.tokenizers import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(TEXTS, 300).save_pretrained(tmp)
        tokenizer = GemmaTokenizerFast.from_pretrained(tmp)
    tokenizer.padding_side = "right"
    torch.manual_seed(0)  # the constructors draw initial weights; randomize_torch_ overwrites them all
    text_encoder = randomize_torch_(GemmaModel(GemmaConfig(vocab_size=len(tokenizer), **GEMMA)).eval(), 1, std=0.3)
    transformer = randomize_torch_(LuminaNextDiT2DModel(**NEXTDIT).eval(), 2)
    with torch.no_grad():  # the released checkpoints' tied query: attn2 reads attn1's
        for block in transformer.layers:
            block.attn2.to_q.weight.copy_(block.attn1.to_q.weight)
            block.attn2.norm_q.load_state_dict(block.attn1.norm_q.state_dict())
    vae = randomize_torch_(AutoencoderKL(**VAE).eval(), 3, std=0.05)
    pipe = LuminaPipeline(transformer, FlowMatchEulerDiscreteScheduler(), vae, text_encoder, tokenizer)
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def nextdit_cases(transformer, rng) -> dict:
    import torch
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    cfg, out = transformer.config, {}
    for name, (h, w, scale, base, t_value) in NEXTDIT_CASES.items():
        linear, ntk = (scale, 1.0) if t_value is not None and t_value < WATERSHED else (1.0, scale)
        x = rng.standard_normal((2, cfg.in_channels, h, w)).astype(np.float32)
        t = rng.uniform(0, 1, 2).astype(np.float32) if t_value is None else np.full(2, t_value, np.float32)
        cap, mask = captions(rng, cfg.cross_attention_dim)
        rope = get_2d_rotary_pos_embed_lumina(transformer.head_dim, 384, 384, linear_factor=linear, ntk_factor=ntk)
        kwargs = {} if base is None else {"base_sequence_length": base}
        with torch.no_grad():
            y = transformer(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cap), torch.from_numpy(mask),
                            rope, cross_attention_kwargs=kwargs, return_dict=False)[0]  # fmt: skip
        y = y[:, : cfg.in_channels]  # the velocity; learned sigma dropped
        out |= _prefixed(f"nextdit/{name}", x=x, t=t, cap_feats=cap, cap_mask=mask, out=y.numpy())
    return out


def captions(rng, dim: int) -> tuple:
    """(2, 8, dim) random caption features, mask (2, 8) int32 with row 1 padded from token 5 (its padded features
    random too, so a port that reads them fails)."""
    cap = rng.standard_normal((2, CAPTION_LEN, dim)).astype(np.float32)
    mask = np.ones((2, CAPTION_LEN), np.int32)
    mask[1, PADDED_FROM:] = 0
    return cap, mask


def flagdit_case(dest: str) -> dict:
    """The original Flag-DiT fixture: weights and arguments copied as files, inputs and output into the cases."""
    os.makedirs(dest)
    for name in ("consolidated.00-of-01.safetensors", "model_args.json"):
        shutil.copyfile(os.path.join(FLAGDIT_FIXTURE, name), os.path.join(dest, name))
    io = np.load(os.path.join(FLAGDIT_FIXTURE, "io.npz"))
    return _prefixed("flagdit/plain", **{k: io[k] for k in ("x", "t", "cap_feats", "cap_mask", "out")})


def gemma_case(pipe) -> dict:
    import torch

    tokens = pipe.tokenizer(PROMPTS + ["", ""], padding=True, pad_to_multiple_of=8, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask,
                                   output_hidden_states=True).hidden_states[-2]  # fmt: skip
    ids, mask = tokens.input_ids.numpy().astype(np.int32), tokens.attention_mask.numpy().astype(np.int32)
    return _prefixed("gemma/plain", input_ids=ids, attention_mask=mask, hidden=hidden.numpy())


def vae_case(pipe, rng) -> dict:
    import torch

    latent = rng.standard_normal((1, pipe.vae.config.latent_channels, 6, 10)).astype(np.float32)
    with torch.no_grad():
        image = pipe.vae.decode(torch.from_numpy(latent)).sample.numpy()
    return _prefixed("vae/plain", latent=latent, image=image)


def sampling_case(pipe, rng) -> dict:
    """``LuminaPipeline`` on two prompts, its latent after every Euler step and its time grid (Lumina time)."""
    import torch

    h, w = SAMPLING["height"] // 8, SAMPLING["width"] // 8
    noise = rng.standard_normal((2, pipe.vae.config.latent_channels, h, w)).astype(np.float32)
    steps = []

    def on_step(_pipe, _i, _t, kwargs):
        steps.append(kwargs["latents"].float().numpy())
        return {}

    with torch.no_grad():
        pipe(prompt=PROMPTS[:2], negative_prompt="", height=SAMPLING["height"], width=SAMPLING["width"],
             num_inference_steps=SAMPLING["steps"], guidance_scale=SAMPLING["guidance_scale"], clean_caption=False,
             latents=torch.from_numpy(noise), output_type="latent", return_dict=False, callback_on_step_end=on_step,
             callback_on_step_end_tensor_inputs=["latents"])  # fmt: skip
    grid = (1.0 - pipe.scheduler.sigmas.double().numpy()).astype(np.float64)
    return _prefixed("sampling/plain", noise=noise, grid=grid, steps=np.stack(steps))


def training_case(transformer, rng) -> dict:
    """Loss ``mean((v - (x1 - x0))^2)`` at ``x_t = t x1 + (1 - t) x0`` and every gradient, by project name."""
    import torch
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    from mindone_lumina.weights.nextdit import DIFFUSERS_RULES

    cfg = transformer.config
    x1 = rng.standard_normal((2, cfg.in_channels, 6, 10)).astype(np.float32)
    x0 = rng.standard_normal(x1.shape).astype(np.float32)
    t = rng.uniform(0, 1, 2).astype(np.float32)
    cap, mask = captions(rng, cfg.cross_attention_dim)
    tt = t.reshape(-1, 1, 1, 1)
    rope = get_2d_rotary_pos_embed_lumina(transformer.head_dim, 384, 384)
    transformer.zero_grad(set_to_none=True)
    v = transformer(torch.from_numpy(tt * x1 + (1 - tt) * x0), torch.from_numpy(t), torch.from_numpy(cap),
                    torch.from_numpy(mask), rope, cross_attention_kwargs={}, return_dict=False)[0]  # fmt: skip
    loss = ((v[:, : cfg.in_channels] - torch.from_numpy(x1 - x0)) ** 2).mean()
    loss.backward()
    grads = {}
    for name, p in transformer.named_parameters():
        target = DIFFUSERS_RULES.target_of(name)
        assert target is not None, name
        g = np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy()
        grads[target] = grads[target] + g if target in grads else g.copy()
    arrays = _prefixed("training/plain", x1=x1, x0=x0, t=t, cap_feats=cap, cap_mask=mask,
                       loss=np.array(loss.item(), np.float32))  # fmt: skip
    return arrays | {f"training/plain/grad/{k}": v for k, v in grads.items()}


def _prefixed(prefix: str, **arrays) -> dict:
    return {f"{prefix}/{k}": np.asarray(v) for k, v in arrays.items()}


def manifest() -> dict:
    import diffusers
    import torch
    import transformers

    nextdit = {k: dict(zip(("latent_h", "latent_w", "scale_factor", "base_seqlen", "t"), v), scale_watershed=WATERSHED)
               for k, v in NEXTDIT_CASES.items()}  # fmt: skip
    return {
        "generator": "tools/make_golden.py",
        "references": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "flagdit": "original Lumina-T2X 1c60696 via tests/fixtures/original-flagdit-tiny",
        },
        "made_on": f"{platform.machine()} {platform.system()}, torch threads 1",
        "cases": {
            "nextdit": nextdit,
            "sampling": {**SAMPLING, "prompts": PROMPTS[:2], "negative_prompt": ""},
            "gemma": {"prompts": PROMPTS + ["", ""]},
        },
    }


def generate(folder: str) -> None:
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(0)
    pipe = build_pipeline(folder)
    arrays = nextdit_cases(pipe.transformer, rng)
    arrays |= flagdit_case(os.path.join(folder, golden.FLAGDIT))
    arrays |= gemma_case(pipe) | vae_case(pipe, rng) | sampling_case(pipe, rng)
    arrays |= training_case(pipe.transformer, rng)
    golden.write_cases(folder, arrays)
    golden.write_manifest(folder, manifest())


def differences(new: str, old: str) -> tuple:
    """(problems, largest relative difference of the case arrays): files that differ or exist on one side only, case
    arrays that differ in key, shape or dtype, or by more than ``CHECK_RTOL``."""

    def files(root):
        return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}

    a, b = files(new), files(old)
    same = sorted((a & b) - {golden.CASES})
    problems = sorted(a ^ b) + [p for p in same if not filecmp.cmp(*(os.path.join(r, p) for r in (new, old)), False)]
    if golden.CASES not in a & b:
        return problems, 0.0
    fresh, shipped = (SafetensorsFile(os.path.join(r, golden.CASES)) for r in (new, old))
    problems += [f"{golden.CASES}: {k} on one side only" for k in sorted(set(fresh.keys()) ^ set(shipped.keys()))]
    # each array against the largest magnitude of its group, the key without its last part ("nextdit/pi",
    # "training/plain/grad"): a gradient that is zero but for rounding (a key-norm bias under softmax) is judged on
    # its model's gradients, as the self-check does
    reference = {key: shipped.read(key) for key in sorted(set(fresh.keys()) & set(shipped.keys()))}
    scale = {}
    for key, y in reference.items():
        group = key.rsplit("/", 1)[0]
        scale[group] = max(scale.get(group, 0.0), float(np.abs(y.astype(np.float64)).max(initial=0)))
    worst = 0.0
    for key, y in reference.items():
        x = fresh.read(key)
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{golden.CASES}: {key} is {x.dtype}{list(x.shape)}, shipped {y.dtype}{list(y.shape)}")
            continue
        if np.array_equal(x, y):
            continue
        rel = float(np.abs(x.astype(np.float64) - y).max() / max(scale[key.rsplit("/", 1)[0]], 1e-30))
        worst = max(worst, rel)
        if not rel <= CHECK_RTOL:  # NaN fails too
            problems.append(f"{golden.CASES}: {key} differs by {rel:.2g} of its group's largest value")
    return problems, worst


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.check:
        cli.existing(args.out, "--out", "folder")
        with tempfile.TemporaryDirectory() as tmp:
            fresh = os.path.join(tmp, "golden")
            os.makedirs(fresh)
            generate(fresh)
            problems, worst = differences(fresh, args.out)
        if problems:
            print(f"differs from {args.out}: " + "; ".join(problems))
            return 1
        print("bit-identical" if worst == 0 else f"equal: every file bit for bit, the case arrays within {worst:.2g}")
        return 0
    with atomic.staged_folder(args.out, replace=True) as tmp:
        generate(tmp)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    cli.run(main)
