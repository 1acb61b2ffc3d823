"""Flag-DiT parity against the outputs of the original Lumina-T2X ``lumina_t2i`` code (tests/fixtures/
original-flagdit-tiny, see its README): ``forward`` and ``forward_with_cfg`` at fp32 relative Frobenius error <= 1e-5
in graph mode and PyNative; RoPE tables against the original ``precompute_freqs_cis``; parameter counts; checkpoint
loading (original names, model-parallel merge) and ``tools/forward.py --family flagdit``."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import BUDGETS, FIXTURES, forward_with_cfg, load_tool, rel_err
from safetensors.numpy import load_file, save_file

import mindspore as ms
from mindspore import Tensor

from mindone_lumina import components, rope
from mindone_lumina.models import flagdit
from mindone_lumina.models.layers import parameter_count
from mindone_lumina.weights.flagdit import FLAGDIT
from mindone_lumina.weights.load import empty, load_state_dict, param_shapes

FP32_BUDGET = BUDGETS["fp32"]["transformer"]
ORIGINAL = os.path.join(FIXTURES, "original-flagdit-tiny")
WEIGHTS = os.path.join(ORIGINAL, "consolidated.00-of-01.safetensors")


def _tensors(*arrays):
    return [Tensor(a) for a in arrays]


@pytest.fixture(scope="module")
def original():
    cfg = flagdit.resolve_config(os.path.join(ORIGINAL, "model_args.json"))
    model = flagdit.FlagDiT(cfg)
    load_state_dict(model, load_file(WEIGHTS))
    with open(os.path.join(ORIGINAL, "cfg_settings.json")) as f:
        settings = json.load(f)
    return model, dict(np.load(os.path.join(ORIGINAL, "io.npz"))), settings


def _scaling(s):
    return flagdit.RopeScaling(s["rope_scaling_factor"], s["ntk_factor"], s["base_seqlen"])


# ------------------------------------------------------------------------------------------------------------------
# Against the original code's own outputs
# ------------------------------------------------------------------------------------------------------------------
def test_original_forward(original, mode):
    model, io, _ = original
    out = flagdit.forward(model, *_tensors(io["x"], io["t"], io["cap_feats"], io["cap_mask"])).asnumpy()
    assert rel_err(out, io["out"]) <= FP32_BUDGET
    assert np.abs(out - io["out"]).max() < 1e-4


def test_original_forward_with_cfg(original, mode):
    """rope_scaling_factor 2, ntk_factor 3, proportional attention with base 30, guidance 4 on channels 0-2."""
    model, io, s = original
    args = _tensors(io["x"], io["cfg_t"], io["cap_feats"], io["cap_mask"])
    out = forward_with_cfg(flagdit, model, *args, s["cfg_scale"], _scaling(s)).asnumpy()
    assert rel_err(out, io["cfg_out"]) <= FP32_BUDGET
    plain = forward_with_cfg(flagdit, model, *args, s["cfg_scale"]).asnumpy()
    assert rel_err(plain, io["cfg_out"]) > 1e-3  # the scaling settings really change the output
    assert np.array_equal(out[0, :3], out[1, :3])  # guided channels repeated; channel 3 per half
    assert not np.array_equal(out[0, 3], out[1, 3])


def test_scaling_defaults_to_the_config(original, pynative):
    """With no override, ``forward`` uses the constructor's factors, as the original's ``freqs_cis`` does."""
    model, io, s = original
    scaled_cfg = dataclasses.replace(
        model.cfg, rope_scaling_factor=s["rope_scaling_factor"], ntk_factor=s["ntk_factor"]
    )
    scaled = flagdit.FlagDiT(scaled_cfg)
    load_state_dict(scaled, load_file(WEIGHTS))
    args = _tensors(io["x"], io["t"], io["cap_feats"], io["cap_mask"])
    explicit = flagdit.forward(model, *args, flagdit.RopeScaling(s["rope_scaling_factor"], s["ntk_factor"]))
    assert np.array_equal(flagdit.forward(scaled, *args).asnumpy(), explicit.asnumpy())


def test_graph_compiles_once_per_resolution(original):
    """New RoPE scaling and proportional attention reuse the graph; only a new latent size compiles."""
    model, io, s = original
    fresh = flagdit.FlagDiT(model.cfg)
    ms.set_context(mode=ms.GRAPH_MODE)
    x, t, cap, mask = io["x"], io["t"], io["cap_feats"], io["cap_mask"]
    for scaling in (flagdit.RopeScaling(), _scaling(s)):
        flagdit.forward(fresh, *_tensors(x, t, cap, mask), scaling)
    assert len(fresh.compile_cache) == 1
    flagdit.forward(fresh, *_tensors(x[:, :, :6], t, cap, mask))
    assert len(fresh.compile_cache) == 2


# ------------------------------------------------------------------------------------------------------------------
# Configs, parameter counts, bad inputs
# ------------------------------------------------------------------------------------------------------------------
SMALL = [
    dict(dim=64, n_layers=2, n_heads=4, qk_norm=True, cap_feat_dim=32, multiple_of=16),  # the fixture's
    dict(dim=48, n_layers=3, n_heads=4, n_kv_heads=2, qk_norm=False, learn_sigma=False, cap_feat_dim=20,
         ffn_dim_multiplier=1.3, multiple_of=8, patch_size=1, in_channels=3),
    dict(dim=2048, n_layers=1, n_heads=16, qk_norm=True, cap_feat_dim=24),  # cond_dim 1024 < dim
]  # fmt: skip


@pytest.mark.parametrize("kw", SMALL)
def test_parameter_count_formula(kw):
    cfg = flagdit.FlagDiTConfig(**kw)
    assert parameter_count(flagdit.FlagDiT(cfg)) == cfg.num_parameters()


def test_preset_parameter_count():
    cfg = flagdit.PRESETS["flagdit-5b"]
    assert (cfg.head_dim, cfg.kv_heads, cfg.ffn_hidden, cfg.cond_dim) == (96, 32, 8192, 1024)
    assert cfg.num_parameters() == 5_046_643_744  # "5B"; LLaMA-2-7B hidden 4096 as caption width
    assert sum(math.prod(s) for s in param_shapes(empty(flagdit.FlagDiT, cfg)).values()) == cfg.num_parameters()


def test_config_errors():
    with open(os.path.join(ORIGINAL, "model_args.json")) as f:
        args = json.load(f)
    assert flagdit.FlagDiTConfig.from_dict({**args, "rope_scaling_factor": 2.0}).rope_scaling_factor == 2.0
    with pytest.raises(ValueError, match=r"unknown Flag-DiT argument.*'scale_factor'"):
        flagdit.FlagDiTConfig.from_dict({**args, "scale_factor": 1.0})
    with pytest.raises(ValueError, match="1-D RoPE needs head_dim divisible by 2, got 5"):
        flagdit.FlagDiTConfig(dim=20, n_heads=4)
    with pytest.raises(ValueError, match="ntk_factor must be positive"):
        flagdit.FlagDiTConfig(dim=64, n_heads=4, ntk_factor=0.0)
    with pytest.raises(ValueError, match="unknown architecture"):
        flagdit.resolve_config("flagdit-7b")
    with pytest.raises(ValueError, match="exceed the 40000-position RoPE table"):
        rope.flagdit_rope(96, 40001)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "x": a["x"][:, :3]}, r"x must be \(B, 4, H, W\)"),
        (lambda a: {**a, "x": a["x"][:, :, :7]}, "divisible by the patch size 2, got 7x12"),
        (lambda a: {**a, "cap_feats": a["cap_feats"][..., :31]}, r"cap_feats must be \(2, Lc, 32\)"),
        (lambda a: {**a, "cap_mask": a["cap_mask"][:, :5]}, r"cap_mask must be \(2, 6\)"),
        (lambda a: {**a, "t": a["t"][:1]}, r"t must have shape \(2,\)"),
    ],
)
def test_bad_inputs_are_named(original, pynative, change, message):
    model, io, _ = original
    args = change({k: io[k] for k in ("x", "t", "cap_feats", "cap_mask")})
    with pytest.raises(ValueError, match=message):
        flagdit.forward(model, *_tensors(args["x"], args["t"], args["cap_feats"], args["cap_mask"]))


def test_bad_rope_tables_are_named(original, pynative):
    model, io, _ = original
    cos, sin, gain = flagdit.rope_inputs(model.cfg, 8, 10)  # 4 x 6 tokens, the latent is 4 x 7
    with pytest.raises(ValueError, match=r"rope_cos must be \(28, 8\), got shape \(24, 8\)"):
        model(*_tensors(io["x"], io["t"], io["cap_feats"], io["cap_mask"]), cos, sin, gain)


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints and the forward CLI
# ------------------------------------------------------------------------------------------------------------------
def test_bad_checkpoints_are_named(original):
    model, _, _ = original
    state = load_file(WEIGHTS)
    fresh = flagdit.FlagDiT(model.cfg)
    with pytest.raises(ValueError, match=r"missing keys \(1\): eol_token"):
        load_state_dict(fresh, {k: v for k, v in state.items() if k != "eol_token"})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): layers.0.attention_norm1.weight"):
        load_state_dict(fresh, {**state, "layers.0.attention_norm1.weight": np.ones(64, np.float32)})
    assert not FLAGDIT.is_family(os.path.join(FIXTURES, "original-nextdit-tiny"))
    with pytest.raises(ValueError, match="not a Flag-DiT checkpoint"):
        FLAGDIT.plan(os.path.join(FIXTURES, "original-nextdit-tiny"))


def _split(state, world):
    """The rank files fairscale would write for ``state`` (the inverse of ``FAIRSCALE_SHARDS``)."""
    ranks = [{} for _ in range(world)]
    for key, value in state.items():
        dim = FLAGDIT.shards.split_dim(key)
        parts = [value] * world if dim is None else np.split(value, world, axis=dim)
        for r, part in enumerate(parts):
            ranks[r][key] = np.ascontiguousarray(part)
    return ranks


def test_model_parallel_ranks_merge(tmp_path, original):
    model, io, _ = original
    state = load_file(WEIGHTS)
    for r, part in enumerate(_split(state, 2)):
        save_file(part, str(tmp_path / f"consolidated.{r:02d}-of-02.safetensors"))
    with pytest.raises(ValueError, match="per-rank qk LayerNorms"):
        FLAGDIT.plan(str(tmp_path), model.cfg)
    merged = {s.name: s.fetch() for s in FLAGDIT.plan(str(tmp_path), model.cfg, allow_inexact_merge=True)[1]}
    assert sorted(merged) == sorted(state)
    assert all(np.array_equal(merged[k], state[k]) for k in state)
    assert FLAGDIT.is_family(str(tmp_path))


def test_convert_roundtrip_records_config(tmp_path, original):
    model, _, _ = original
    _, specs = FLAGDIT.plan(ORIGINAL, model.cfg, dtype="fp16")
    path = FLAGDIT.write(specs, model.cfg, str(tmp_path / "flag.safetensors"))
    assert FLAGDIT.recorded_config(path) == model.cfg
    state = {s.name: s.fetch() for s in FLAGDIT.plan(path)[1]}
    assert state["eol_token"].dtype == np.float16
    with pytest.raises(ValueError, match="no diffusers Flag-DiT"):
        load_tool("convert").main([ORIGINAL, str(tmp_path / "d"), "--to", "diffusers"])


def test_forward_cli_with_cfg(tmp_path):
    """tools/forward.py --family flagdit reproduces the original forward_with_cfg with its scaling settings."""
    main = load_tool("forward").main
    io = dict(np.load(os.path.join(ORIGINAL, "io.npz")))
    inputs, out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inputs, x=io["x"], t=io["cfg_t"], cap_feats=io["cap_feats"], cap_mask=io["cap_mask"])
    common = ["--checkpoint", ORIGINAL, "--inputs", str(inputs), "--output", str(out), "--mode", "pynative"]
    main([*common, "--family", "flagdit", "--cfg-scale", "4", "--rope-scaling-factor", "2", "--ntk-factor", "3",
          "--base-seqlen", "30"])  # fmt: skip
    assert rel_err(np.load(out)["out"], io["cfg_out"]) <= FP32_BUDGET
    with pytest.raises(ValueError, match="--rope-scaling-factor/--ntk-factor are Flag-DiT's"):
        main([*common, "--ntk-factor", "3"])
    with pytest.raises(ValueError, match="--scale-factor/--scale-watershed are Next-DiT's"):
        main([*common, "--family", "flagdit", "--scale-factor", "2"])


# ------------------------------------------------------------------------------------------------------------------
# Lumina-T2I through the pipeline and tools/sample.py (Flag-DiT + LLaMA + VAE)
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def t2i_parts(tmp_path_factory):
    """A tiny LLaMA folder (hidden 32 = the fixture's cap_feat_dim) and a tiny 8x VAE folder, saved by transformers
    and diffusers; the transformer is the original-format fixture itself."""
    from conftest import SENTENCES
    from diffusers import AutoencoderKL
    from transformers import LlamaConfig, LlamaModel

    from mindone_lumina.text.tokenizers import train_tokenizer

    root = tmp_path_factory.mktemp("lumina-t2i")
    tokenizer = train_tokenizer(SENTENCES, 300, "llama")
    torch.manual_seed(0)
    lm = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128)).eval()  # fmt: skip
    lm.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=64, scaling_factor=0.13025,
    ).eval()  # fmt: skip
    vae.save_pretrained(root / "vae")
    return str(root / "llama"), str(root / "vae")


def test_pipeline_runs_flagdit_with_llama(t2i_parts, original, pynative):
    """The pipeline picks the LLaMA prompt encoding and Lumina-T2I's RoPE settings (ntk = area ratio, base 4224)."""
    from mindone_lumina.pipeline import SampleSettings, TextToImagePipeline
    from mindone_lumina.text import llama

    pipe = TextToImagePipeline.from_pretrained(ORIGINAL, text_encoder=t2i_parts[0], vae=t2i_parts[1])
    assert isinstance(pipe.transformer, flagdit.FlagDiT) and isinstance(pipe.text_encoder.cfg, llama.LlamaConfig)
    model, io, _ = original
    x, t = Tensor(io["x"]), 0.3
    cap, mask = llama.encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle"])
    model_fn = pipe._model_fn(cap, mask, 64, 96, SampleSettings())
    expected = flagdit.forward(
        model, x, Tensor(np.full(2, t, np.float32)), cap, mask,
        flagdit.RopeScaling(ntk_factor=(4 * 6) / 64**2, base_seqlen=64**2 + 64 * 2),
    )  # fmt: skip
    assert np.array_equal(model_fn(x, t).asnumpy(), expected.asnumpy())
    images = pipe(["a red circle"], settings=SampleSettings(height=32, width=48, num_steps=3), progress=False).images
    assert images[0].size == (48, 32)
    with pytest.raises(ValueError, match="context_drop is implemented for Next-DiT only, not Flag-DiT"):
        pipe(["a red circle"], context_drop=2, progress=False)


def test_sample_cli_takes_a_lumina_t2i_checkpoint(t2i_parts, tmp_path):
    from PIL import Image

    sample = load_tool("sample")
    llama_dir, vae_dir = t2i_parts
    args = ["--model", ORIGINAL, "--vae", vae_dir, "--prompt", "a blue square", "--resolution", "32x32", "--steps",
            "3", "--solver", "euler", "--mode", "pynative", "--out", str(tmp_path / "out")]  # fmt: skip
    sample.main([*args, "--text-encoder", llama_dir])
    assert Image.open(tmp_path / "out" / "000_a-blue-square_seed0.png").size == (32, 32)
    with pytest.raises(ValueError, match="expected a Gemma-1 or LLaMA config"):
        sample.main([*args, "--gemma", vae_dir])  # the old flag name still works; a VAE folder is no LLaMA


def test_convert_cli_writes_a_loadable_flagdit(tmp_path, original, pynative):
    """tools/convert.py recognises the Flag-DiT checkpoint, converts it strictly and verifies the output."""
    model, io, _ = original
    convert = load_tool("convert").main
    out = str(tmp_path / "flag.safetensors")
    convert([ORIGINAL, out, "--verify"])
    fresh = components.load_transformer(out)
    args = _tensors(io["x"], io["t"], io["cap_feats"], io["cap_mask"])
    assert np.array_equal(flagdit.forward(fresh, *args).asnumpy(), flagdit.forward(model, *args).asnumpy())
    with pytest.raises(ValueError, match="no diffusers Flag-DiT"):
        convert([ORIGINAL, str(tmp_path / "d"), "--to", "diffusers"])
