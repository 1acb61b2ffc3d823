"""Next-DiT parity: against the original Lumina-T2X outputs (fixtures) and against diffusers==0.35.2
``LuminaNextDiT2DModel`` (equal to the original once weights are mapped). Budgets: fp32 relative Frobenius error
<= 1e-5, fp16 <= 5e-3, graph vs PyNative <= 1e-6."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from conftest import BUDGETS, FIXTURES, forward_with_cfg, load_tool, randomize_torch_, rel_err
from diffusers import LuminaNextDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
from safetensors.numpy import load_file

import mindspore as ms
from mindspore import Tensor

from mindone_lumina import training
from mindone_lumina.models import nextdit
from mindone_lumina.models.layers import cast_parameters, parameter_count
from mindone_lumina.weights.load import load_state_dict
from mindone_lumina.weights.nextdit import DIFFUSERS_RULES, DIFFUSERS_UNTIED_RULES

FP32_BUDGET, FP16_BUDGET = BUDGETS["fp32"]["transformer"], BUDGETS["fp16"]["transformer"]
MODE_BUDGET = 1e-6
# training gradients against torch autograd, relative to each tensor's norm (floored at 1e-3 of the largest norm):
# measured <= 2.9e-6 (fp32, the three configs, graph and PyNative)
GRAD_BUDGET = 2e-5
ORIGINAL = os.path.join(FIXTURES, "original-nextdit-tiny")


def _tensors(*arrays):
    return [Tensor(a) for a in arrays]


# ------------------------------------------------------------------------------------------------------------------
# Against the original code's own outputs
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def original():
    cfg = nextdit.resolve_config(os.path.join(ORIGINAL, "model_args.json"))
    model = nextdit.NextDiT(cfg)
    load_state_dict(model, load_file(os.path.join(ORIGINAL, "consolidated.00-of-01.safetensors")))
    with open(os.path.join(ORIGINAL, "cfg_settings.json")) as f:
        settings = json.load(f)
    return model, dict(np.load(os.path.join(ORIGINAL, "io.npz"))), settings


def test_original_forward(original, mode):
    model, io, _ = original
    out = nextdit.forward(model, *_tensors(io["x"], io["t"], io["cap_feats"], io["cap_mask"]))
    assert rel_err(out.asnumpy(), io["out"]) <= FP32_BUDGET
    assert np.abs(out.asnumpy() - io["out"]).max() < 1e-4


@pytest.mark.parametrize("branch", ["pi", "ntk"])
def test_original_forward_with_cfg(original, mode, branch):
    """forward_with_cfg with scale 1.5, watershed 0.3, proportional attention: t=0.1 interpolates, t=0.7 is NTK."""
    model, io, s = original
    scaling = nextdit.RopeScaling(s["scale_factor"], s["scale_watershed"], base_seqlen=s["base_seqlen"])
    x, t = io["x"], io[f"cfg_{branch}_t"]
    out = forward_with_cfg(nextdit, model, *_tensors(x, t, io["cap_feats"], io["cap_mask"]), s["cfg_scale"], scaling)
    assert rel_err(out.asnumpy(), io[f"cfg_{branch}_out"]) <= FP32_BUDGET


def test_graph_equals_pynative(original):
    model, io, _ = original
    outs = {}
    for mode in (ms.GRAPH_MODE, ms.PYNATIVE_MODE):
        ms.set_context(mode=mode)
        outs[mode] = nextdit.forward(model, *_tensors(io["x"], io["t"], io["cap_feats"], io["cap_mask"])).asnumpy()
    assert rel_err(outs[ms.GRAPH_MODE], outs[ms.PYNATIVE_MODE]) <= MODE_BUDGET


def test_cfg_guides_only_three_channels(original, pynative):
    model, io, _ = original
    args = _tensors(io["x"], io["t"], io["cap_feats"], io["cap_mask"])
    plain = nextdit.forward(model, Tensor(np.concatenate([io["x"][:1]] * 2)), *args[1:]).asnumpy()
    out3 = forward_with_cfg(nextdit, model, *args, 3.0).asnumpy()
    out_all = forward_with_cfg(nextdit, model, *args, 3.0, guided_channels=None).asnumpy()
    guided = plain[1] + 3.0 * (plain[0] - plain[1])
    assert np.abs(out3[0, :3] - guided[:3]).max() < 1e-5
    assert np.abs(out3[0, 3] - plain[0, 3]).max() < 1e-5  # channel 3 keeps the conditional value
    assert np.abs(out_all[0] - guided).max() < 1e-5
    assert np.abs(out3[1, :3] - out3[0, :3]).max() == 0.0
    assert np.abs(out3[1, 3] - plain[1, 3]).max() < 1e-5  # the unconditional half keeps its own channel 3


# ------------------------------------------------------------------------------------------------------------------
# Against diffusers LuminaNextDiT2DModel
# ------------------------------------------------------------------------------------------------------------------
CONFIGS = {
    # GQA, qk-norm, learned sigma, custom FFN multiplier
    "gqa": dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, qk_norm=True, learn_sigma=True,
                ffn_dim_multiplier=1.3, multiple_of=16, cross_attention_dim=24),
    # MHA, no qk-norm, no learned sigma
    "mha": dict(hidden_size=48, num_layers=3, num_attention_heads=3, num_kv_heads=None, qk_norm=False,
                learn_sigma=False, multiple_of=32, cross_attention_dim=40),
    # one kv head (multi-query), head_dim 16, patch 2, wide caption
    "mqa": dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=1, qk_norm=True, learn_sigma=True,
                multiple_of=8, cross_attention_dim=72),
}  # fmt: skip


def _diffusers_config(kw):
    return NextDiTConfigFromDiffusers(**kw)


def NextDiTConfigFromDiffusers(**kw):  # noqa: N802 - mirrors the diffusers constructor
    return nextdit.NextDiTConfig(
        patch_size=2, in_channels=4, dim=kw["hidden_size"], n_layers=kw["num_layers"],
        n_heads=kw["num_attention_heads"], n_kv_heads=kw["num_kv_heads"], multiple_of=kw["multiple_of"],
        ffn_dim_multiplier=kw.get("ffn_dim_multiplier"), norm_eps=1e-5, learn_sigma=kw["learn_sigma"],
        qk_norm=kw["qk_norm"], cap_feat_dim=kw["cross_attention_dim"],
    )  # fmt: skip


def _inputs(cfg, seed, batch=2, h=8, w=12, cap_len=7):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.in_channels, h, w)).astype(np.float32)
    t = rng.uniform(0, 1, batch).astype(np.float32)
    cap = rng.standard_normal((batch, cap_len, cfg.cap_feat_dim)).astype(np.float32)
    mask = np.ones((batch, cap_len), np.int32)
    mask[0, 4:] = 0  # padded caption
    mask[-1, 2:] = 0
    return x, t, cap, mask


@pytest.fixture(scope="module", params=[*CONFIGS, "gqa-untied"])
def pair(request):
    """(name, diffusers model, project model, rule table). "-untied": attn2's query differs from attn1's, as in a
    model trained in diffusers; the project model then has its own cross-attention query."""
    name = request.param.removesuffix("-untied")
    untied = name != request.param
    kw = CONFIGS[name]
    torch.manual_seed(0)
    ref = randomize_torch_(LuminaNextDiT2DModel(sample_size=16, patch_size=2, in_channels=4, **kw).eval(), seed=1)
    if not untied:
        _tie_diffusers_copies_(ref)
    cfg = dataclasses.replace(_diffusers_config(kw), separate_cross_query=untied)
    model = nextdit.NextDiT(cfg)
    table = DIFFUSERS_UNTIED_RULES if untied else DIFFUSERS_RULES
    load_state_dict(model, {k: v.numpy() for k, v in ref.state_dict().items()}, table)
    assert parameter_count(model) == cfg.num_parameters()
    return name, ref, model, table


def _tie_diffusers_copies_(ref):
    """diffusers keeps wq / q_norm twice (attn1 and attn2); real checkpoints hold equal copies, so make them equal."""
    with torch.no_grad():
        for block in ref.layers:
            block.attn2.to_q.weight.copy_(block.attn1.to_q.weight)
            if block.attn1.norm_q is not None:
                block.attn2.norm_q.load_state_dict(block.attn1.norm_q.state_dict())


def _reference(ref, cfg, x, t, cap, mask, linear=1.0, ntk=1.0, base_seqlen=None):
    rope = get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384, linear_factor=linear, ntk_factor=ntk)
    kwargs = {} if base_seqlen is None else {"base_sequence_length": base_seqlen}
    with torch.no_grad():
        out = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cap), torch.from_numpy(mask), rope,
                  cross_attention_kwargs=kwargs, return_dict=False)[0]  # fmt: skip
    out = out.float().numpy()
    return out[:, : cfg.in_channels] if cfg.learn_sigma else out


def test_diffusers_fp32(pair, mode):
    name, ref, model, _ = pair
    x, t, cap, mask = _inputs(model.cfg, seed=2, h=8, w=12 if name != "mha" else 6)
    out = nextdit.forward(model, *_tensors(x, t, cap, mask)).asnumpy()
    assert rel_err(out, _reference(ref, model.cfg, x, t, cap, mask)) <= FP32_BUDGET


@pytest.mark.parametrize("timestep", [0.1, 0.8])
def test_diffusers_scaled_rope_and_proportional_attention(pair, mode, timestep):
    """scale_factor 2 with watershed 0.5: t=0.1 uses position interpolation, t=0.8 NTK; base_seqlen 10 tokens."""
    _, ref, model, _ = pair
    x, t, cap, mask = _inputs(model.cfg, seed=3, h=10, w=8)
    t[:] = timestep
    scaling = nextdit.RopeScaling(scale_factor=2.0, scale_watershed=0.5, base_seqlen=10)
    out = nextdit.forward(model, *_tensors(x, t, cap, mask), scaling).asnumpy()
    linear, ntk = (2.0, 1.0) if timestep < 0.5 else (1.0, 2.0)
    expected = _reference(ref, model.cfg, x, t, cap, mask, linear, ntk, base_seqlen=10)
    assert rel_err(out, expected) <= FP32_BUDGET
    unscaled = nextdit.forward(model, *_tensors(x, t, cap, mask)).asnumpy()
    assert rel_err(unscaled, expected) > 1e-3  # the scaling really changes the output


def test_diffusers_fp16(pair, mode):
    name, ref, model32, _ = pair
    model = nextdit.NextDiT(model32.cfg)
    load_state_dict(model, {p.name: p.asnumpy() for p in model32.get_parameters()})
    cast_parameters(model, ms.float16)
    x, t, cap, mask = _inputs(model.cfg, seed=4)
    out = nextdit.forward(model, *_tensors(x.astype(np.float16), t, cap.astype(np.float16), mask))
    assert out.dtype == ms.float16
    assert rel_err(out.asnumpy(), _reference(ref, model.cfg, x, t, cap, mask)) <= FP16_BUDGET


def test_training_gradients_match_diffusers(pair, mode):
    """The flow-matching loss of ``training.FlowMatchingLoss`` and the gradient of every parameter against diffusers'
    autograd on the same weights and batch. diffusers holds wq and q_norm twice (attn1 and attn2): the project's one
    tensor gets the sum of both copies' gradients (untied: each its own)."""
    _, ref, model, table = pair
    cfg = model.cfg
    x1, t, cap, mask = _inputs(cfg, seed=6)
    x0 = np.random.default_rng(7).standard_normal(x1.shape).astype(np.float32)
    xt = t.reshape(-1, 1, 1, 1) * x1 + (1 - t.reshape(-1, 1, 1, 1)) * x0
    rope = get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384)
    ref.zero_grad(set_to_none=True)
    v = ref(torch.from_numpy(xt), torch.from_numpy(t), torch.from_numpy(cap), torch.from_numpy(mask), rope,
            cross_attention_kwargs={}, return_dict=False)[0][:, : cfg.in_channels]  # fmt: skip
    expected_loss = ((v - torch.from_numpy(x1 - x0)) ** 2).mean()
    expected_loss.backward()
    ref_grads = dict(ref.named_parameters())

    loss_cell = training.FlowMatchingLoss(model)
    named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]
    grad_fn = ms.value_and_grad(loss_cell, None, [p for _, p in named])
    if mode == "graph":
        grad_fn = ms.jit(grad_fn)
    h, w = x1.shape[2:]
    loss, grads = grad_fn(*_tensors(x1, x0, t, cap, mask), *nextdit.rope_inputs(cfg, h, w, 1.0))
    assert abs(float(loss) - expected_loss.item()) <= 1e-6 * expected_loss.item()
    floor = 1e-3 * max(float(p.grad.norm()) for p in ref.parameters() if p.grad is not None)
    for (name, _), grad in zip(named, grads):
        sources = table.sources_of(name)
        expected = sum(ref_grads[s].grad.numpy() for s in sources if ref_grads[s].grad is not None)
        if name == "pad_token":  # unused by the batched path, as in diffusers
            assert np.abs(grad.asnumpy()).max() == 0.0
            continue
        err = np.linalg.norm(grad.asnumpy() - expected) / max(np.linalg.norm(expected), floor)
        assert err <= GRAD_BUDGET, (name, err)


def test_padded_caption_tokens_are_ignored(pair, pynative):
    _, _, model, _ = pair
    x, t, cap, mask = _inputs(model.cfg, seed=5)
    changed = cap.copy()
    changed[mask == 0] = 100.0
    a = nextdit.forward(model, *_tensors(x, t, cap, mask)).asnumpy()
    b = nextdit.forward(model, *_tensors(x, t, changed, mask)).asnumpy()
    assert np.abs(a - b).max() < 1e-6


# ------------------------------------------------------------------------------------------------------------------
# Configs and presets
# ------------------------------------------------------------------------------------------------------------------
def test_preset_parameter_counts():
    assert nextdit.PRESETS["nextdit-2b-gqa"].num_parameters() == 1_627_386_400  # released Lumina-Next-T2I / SFT
    assert nextdit.PRESETS["nextdit-2b-gqa"].ffn_hidden == 6144
    assert nextdit.PRESETS["nextdit-2b"].num_parameters() > 1_900_000_000


def test_config_from_original_args():
    with open(os.path.join(ORIGINAL, "model_args.json")) as f:
        args = json.load(f)
    cfg = nextdit.NextDiTConfig.from_dict({**args, "scale_factor": 1.0, "use_flash_attn": False})
    assert (cfg.dim, cfg.kv_heads, cfg.head_dim) == (64, 2, 16)
    with pytest.raises(ValueError, match="unknown Next-DiT argument.*'n_experts'"):
        nextdit.NextDiTConfig.from_dict({**args, "n_experts": 4})
    with pytest.raises(ValueError, match="divisible by n_heads"):
        nextdit.NextDiTConfig(dim=65, n_heads=4)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        nextdit.NextDiTConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown architecture"):
        nextdit.resolve_config("nextdit-7b")


def test_graph_compiles_once_per_resolution(original):
    """New timesteps, RoPE scaling and proportional attention reuse the graph; only a new latent size compiles."""
    model, io, _ = original
    fresh = nextdit.NextDiT(model.cfg)
    ms.set_context(mode=ms.GRAPH_MODE)
    x, t, cap, mask = io["x"], io["t"], io["cap_feats"], io["cap_mask"]
    for scaling, t_val in [(nextdit.RopeScaling(), 0.2), (nextdit.RopeScaling(1.5, 0.3, base_seqlen=32), 0.9)]:
        nextdit.forward(fresh, *_tensors(x, np.full_like(t, t_val), cap, mask), scaling)
    assert len(fresh.compile_cache) == 1
    nextdit.forward(fresh, *_tensors(x[:, :, :6], t, cap, mask))
    assert len(fresh.compile_cache) == 2


def test_shared_block_runner_is_bitwise_the_model(original, mode):
    """One block graph with each layer's weights bound in turn: exactly the whole-model output (with RoPE scaling
    and proportional attention), one block compilation for all layers and calls, inputs checked as the model's."""
    model, io, s = original
    names = [p.name for p in model.get_parameters()]
    shared = nextdit.SharedBlockNextDiT(model)
    scaling = nextdit.RopeScaling(s["scale_factor"], s["scale_watershed"], base_seqlen=s["base_seqlen"])
    args = _tensors(io["x"], io["cfg_ntk_t"], io["cap_feats"], io["cap_mask"])
    for _ in range(2):
        np.testing.assert_array_equal(
            nextdit.forward(shared, *args, scaling).asnumpy(), nextdit.forward(model, *args, scaling).asnumpy()
        )
    assert model.cfg.n_layers > 1
    if mode == "graph":
        assert len(shared.block.compile_cache) == 1
    with pytest.raises(ValueError, match="t must have shape"):
        nextdit.forward(shared, args[0], Tensor(np.zeros(5, np.float32)), *args[2:])
    assert [p.name for p in model.get_parameters()] == names  # the runner leaves the model's parameter names alone


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
        nextdit.forward(model, *_tensors(args["x"], args["t"], args["cap_feats"], args["cap_mask"]))


def test_bad_checkpoints_are_named(original):
    model, _, _ = original
    state = load_file(os.path.join(ORIGINAL, "consolidated.00-of-01.safetensors"))
    fresh = nextdit.NextDiT(model.cfg)
    missing = {k: v for k, v in state.items() if k != "layers.1.attention.gate"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): layers.1.attention.gate"):
        load_state_dict(fresh, missing)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): layers.9.extra"):
        load_state_dict(fresh, {**state, "layers.9.extra": np.zeros(3, np.float32)})
    bad = {**state, "x_embedder.weight": np.zeros((64, 17), np.float32)}
    with pytest.raises(ValueError, match=r"x_embedder.weight expected \(64, 16\) got \(64, 17\)"):
        load_state_dict(fresh, bad)


def test_forward_cli_on_original_pth_with_cfg(tmp_path):
    """tools/forward.py converts the .pth on the fly and reproduces the original forward_with_cfg (PI branch)."""
    main = load_tool("forward").main
    io = dict(np.load(os.path.join(ORIGINAL, "io.npz")))
    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=io["x"], t=io["cfg_pi_t"], cap_feats=io["cap_feats"], cap_mask=io["cap_mask"])
    out = tmp_path / "out.npz"
    pth, arch = os.path.join(ORIGINAL, "consolidated.00-of-01.pth"), os.path.join(ORIGINAL, "model_args.json")
    main(["--checkpoint", pth, "--arch", arch, "--inputs", str(inputs), "--output", str(out), "--mode", "pynative",
          "--cfg-scale", "4", "--scale-factor", "1.5", "--scale-watershed", "0.3", "--base-seqlen", "32"])  # fmt: skip
    assert rel_err(np.load(out)["out"], io["cfg_pi_out"]) <= FP32_BUDGET
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=io["x"], t=io["t"])
    with pytest.raises(ValueError, match=r"lacks \['cap_feats', 'cap_mask'\]"):
        main(["--checkpoint", os.path.join(ORIGINAL, "consolidated.00-of-01.safetensors"), "--inputs", str(bad),
              "--output", str(out), "--mode", "pynative"])  # fmt: skip


def test_chunked_attention_equals_one_chunk(mode, monkeypatch):
    """Large score matrices are computed in query chunks (``backend._CHUNK_BYTES``); with a tiny bound every size is
    chunked, unevenly here, and the result equals the unchunked one, with key, causal and GQA masking."""
    from mindone_lumina import backend

    rng = np.random.default_rng(0)
    q = Tensor(rng.standard_normal((2, 11, 4, 8)).astype(np.float32))
    k, v = (Tensor(rng.standard_normal((2, 11, 2, 8)).astype(np.float32)) for _ in range(2))
    keys = Tensor(np.array([[1] * 11, [1] * 6 + [0] * 5], bool))
    causal = Tensor(np.tril(np.ones((11, 11), bool))[None, None])

    def run():
        return backend.attention(q, k, v, keys, 0.3, False, attn_mask=causal).asnumpy()

    whole = run()
    monkeypatch.setattr(backend, "_CHUNK_BYTES", 2 * 4 * 3 * 11 * 4)  # 3 query rows per chunk: 4 chunks of 3, 3, 3, 2
    np.testing.assert_allclose(run(), whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype, atol", [(np.float32, 1e-6), (np.float16, 5e-3)])
def test_attention_equals_the_numpy_reference(mode, dtype, atol):
    """The portable attention folds the scale into the queries and the key mask into the matmul (one more feature);
    it equals explicit masked softmax attention, with GQA, a key mask, a causal mask and chunking."""
    from mindone_lumina import backend

    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 9, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 9, 2, 8)).astype(np.float32) for _ in range(2))
    q, k, v = (a.astype(dtype).astype(np.float32) for a in (q, k, v))  # the inputs both sides see
    keys = np.array([[1] * 9, [1] * 5 + [0] * 4], bool)
    causal = np.tril(np.ones((9, 9), bool))
    kr, vr = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # query head h uses kv head h // 2
    scores = np.einsum("blnd,bsnd->bnls", q, kr) * 0.3
    scores = np.where(keys[:, None, None, :] & causal[None, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bnls,bsnd->blnd", probs / probs.sum(-1, keepdims=True), vr)
    t = (Tensor(a.astype(dtype)) for a in (q, k, v))
    got = backend.attention(*t, Tensor(keys), 0.3, False, attn_mask=Tensor(causal[None, None])).asnumpy()
    assert got.dtype == dtype
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=0, atol=atol)
