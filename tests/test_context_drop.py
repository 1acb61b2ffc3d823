"""Context Drop (``models/context_drop.py``, issue #26): merged self-attention against a NumPy reference (explicit
n x n pooling of the finished keys and of the values, then softmax attention) for square, odd, non-square and
panorama grids with grouped kv heads; merge factor 1 and evaluations outside the time window bitwise the model
without it; a graph-mode generation that compiles one merged and one full block graph and no more; the settings'
validation and ``tools/sample.py``'s flags. Generations use the bundled model (its depth and size are read)."""

import json
import math

import numpy as np
import pytest
from conftest import load_tool, rel_err

import mindspore as ms
from mindspore import Tensor

from mindone_lumina import rope
from mindone_lumina.models import context_drop
from mindone_lumina.models.dit_blocks import Attention
from mindone_lumina.models.nextdit import NextDiTConfig, SharedBlockNextDiT
from mindone_lumina.pipeline import DEFAULT_MODEL, TextToImagePipeline
from mindone_lumina.sampling import SampleSettings

BUDGET = 1e-5  # fp32 against the float64 reference, relative Frobenius error
GRIDS = {
    "square": (4, 4, 2),
    "odd": (5, 7, 2),
    "non-square": (6, 4, 3),
    "panorama": (4, 16, 2),
    "panorama-4": (4, 16, 4),
}
PROMPT = "a large red circle in the center on a blue background"


# ------------------------------------------------------------------------------------------------------------------
# The pooling tables
# ------------------------------------------------------------------------------------------------------------------
def _cells(gh: int, gw: int, n: int) -> list:
    """Token indices of each n x n cell of the row-major gh x gw grid, cells row-major (the reference's pooling)."""
    return [[r * gw + c for r in range(i, min(i + n, gh)) for c in range(j, min(j + n, gw))]
            for i in range(0, gh, n) for j in range(0, gw, n)]  # fmt: skip


@pytest.mark.parametrize("gh, gw, n", [*GRIDS.values(), (3, 5, 4), (1, 1, 2), (7, 3, 1), (9, 2, 5)])
def test_tables_average_each_cell_over_its_real_tokens(gh, gw, n):
    index, weight = context_drop.merge_tables(gh, gw, n)
    cells = _cells(gh, gw, n)
    assert index.shape == (len(cells), n * n) and weight.shape == (len(cells), n * n, 1)
    assert context_drop.merged_grid(gh, gw, n) == (math.ceil(gh / n), math.ceil(gw / n))
    for members, idx, w in zip(cells, index, weight[..., 0]):
        assert sorted(idx[w > 0].tolist()) == members  # the real tokens, once each
        np.testing.assert_allclose(w[w > 0], 1.0 / len(members))
        assert set(idx.tolist()) <= set(members)  # an empty slot repeats a member of its own cell


@pytest.mark.parametrize("args", [(0, 4, 2), (4, 4, 0), (4, 2.0, 2), (True, 4, 2)])
def test_tables_refuse_bad_grids(args):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        context_drop.merge_tables(*args)


# ------------------------------------------------------------------------------------------------------------------
# Merged attention against NumPy
# ------------------------------------------------------------------------------------------------------------------
def _layer_norm(x, cell):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + cell.eps) * cell.weight.asnumpy() + cell.bias.asnumpy()


def _rope(x, cos, sin):
    """Rotate adjacent pairs of x (B, L, N, D) by the angles of cos/sin (L, D/2)."""
    re, im = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None].astype(np.float64), sin[None, :, None].astype(np.float64)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = re * c - im * s, re * s + im * c
    return out


def _pool(x, gh: int, gw: int, n: int):
    """Explicit n x n mean pooling of (B, L, ...) over the grid's cells -> (B, S, ...)."""
    return np.stack([x[:, members].mean(axis=1) for members in _cells(gh, gw, n)], axis=1)


def _softmax_attention(q, k, v, scale, key_mask=None):
    """q (B, L, N, D), k and v (B, S, Nkv, D) with grouped heads; key_mask (B, S), True = attend."""
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    scores = np.einsum("blnd,bsnd->bnls", q, k) * scale
    if key_mask is not None:
        scores = np.where(key_mask[:, None, None, :], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bnls,bsnd->blnd", probs / probs.sum(-1, keepdims=True), v)


def _reference(attn: Attention, x, cos, sin, gain, y, y_mask, gh, gw, n):
    """The attention with Context Drop in float64: values pooled after wv (the same, as wv is linear)."""
    w = {name: getattr(attn, name).weight.asnumpy().astype(np.float64) for name in ("wq", "wk", "wv", "wk_y", "wv_y",
                                                                                   "wo")}  # fmt: skip
    b, seq, _ = x.shape
    heads, kv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    xq, xk, xv, yk = x @ w["wq"].T, x @ w["wk"].T, x @ w["wv"].T, y @ w["wk_y"].T
    xq, xk, yk = _layer_norm(xq, attn.q_norm), _layer_norm(xk, attn.k_norm), _layer_norm(yk, attn.ky_norm)
    xq = _rope(xq.reshape(b, seq, heads, d), cos, sin)
    xk = _pool(_rope(xk.reshape(b, seq, kv, d), cos, sin), gh, gw, n)  # the finished keys
    xv = _pool(xv.reshape(b, seq, kv, d), gh, gw, n)
    out = _softmax_attention(xq * gain, xk, xv, attn.scale)
    yv = (y @ w["wv_y"].T).reshape(b, -1, kv, d)
    out_y = _softmax_attention(xq, yk.reshape(b, -1, kv, d), yv, attn.scale, y_mask)
    out = out + out_y * np.tanh(attn.gate.asnumpy())[None, None, :, None]
    return out.reshape(b, seq, -1) @ w["wo"].T


@pytest.mark.parametrize("grid", list(GRIDS))
def test_merged_attention_equals_the_numpy_reference(grid, mode):
    gh, gw, n = GRIDS[grid]
    cfg = NextDiTConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, qk_norm=True, cap_feat_dim=12)  # GQA, head 8
    attn = Attention(cfg)
    rng = np.random.default_rng(gh * 100 + gw * 10 + n)
    for p in attn.get_parameters():  # gate and norms too: the cross branch is open and every weight counts
        p.set_data(Tensor((0.3 * rng.standard_normal(p.shape) + (p.name.endswith("norm.weight"))).astype(np.float32)))
    x = rng.standard_normal((2, gh * gw, cfg.dim)).astype(np.float32)
    y = rng.standard_normal((2, 5, cfg.cap_feat_dim)).astype(np.float32)
    y_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    cos, sin = rope.nextdit_rope(cfg.head_dim, gh, gw)
    gain = np.array([1.3], np.float32)
    inputs = [Tensor(a) for a in (x, cos, sin, gain, y, y_mask)]
    merged = attn(*inputs, *context_drop.merge_inputs(gh, gw, n)).asnumpy()
    expected = _reference(attn, x.astype(np.float64), cos, sin, 1.3, y.astype(np.float64), y_mask, gh, gw, n)
    assert merged.shape == x.shape
    assert rel_err(merged, expected) <= BUDGET
    assert rel_err(attn(*inputs).asnumpy(), expected) > 100 * BUDGET  # merging changed the output


# ------------------------------------------------------------------------------------------------------------------
# Sampling with Context Drop (the bundled model)
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    return TextToImagePipeline.from_pretrained(DEFAULT_MODEL)


def _latents(pipe, **fields) -> np.ndarray:
    """Final latents of the prompt at an odd 5 x 7 token grid (for a patch 2, 4x VAE model), 3 Euler grid points."""
    m = pipe.size_multiple
    settings = SampleSettings(height=5 * m, width=7 * m, num_steps=3, solver="euler", **fields)
    return pipe(PROMPT, seed=3, settings=settings, progress=False).latents


def test_factor_one_and_outside_the_window_are_bitwise_without_context_drop(pipe):
    ms.set_context(mode=ms.GRAPH_MODE)
    plain = _latents(pipe)
    np.testing.assert_array_equal(_latents(pipe, context_drop=1, context_drop_until=1.0), plain)
    np.testing.assert_array_equal(_latents(pipe, context_drop=2, context_drop_until=0.0), plain)  # never t < 0
    merged = _latents(pipe, context_drop=2, context_drop_until=1.0)
    assert np.isfinite(merged).all() and rel_err(merged, plain) > 1e-3


class _Recorder:
    """The denoiser, recording (t, merged) per model evaluation."""

    def __init__(self, denoiser):
        self.denoiser, self.cfg, self.calls = denoiser, denoiser.cfg, []

    def __call__(self, x, t, *args):
        self.calls.append((float(t.asnumpy()[0]), len(args) > 5))  # 5: captions, mask, RoPE tables, gain
        return self.denoiser(x, t, *args)


def test_graph_mode_generation_compiles_one_merged_and_one_full_block_graph(pipe, monkeypatch):
    ms.set_context(mode=ms.GRAPH_MODE)
    shared = pipe.denoiser()
    assert isinstance(shared, SharedBlockNextDiT)
    recorder = _Recorder(shared)
    monkeypatch.setattr(pipe, "denoiser", lambda: recorder)
    m = pipe.size_multiple
    settings = SampleSettings(height=3 * m, width=11 * m, num_steps=3, context_drop=2, context_drop_until=0.5)
    before = len(shared.block.compile_cache)
    first = pipe(PROMPT, seed=0, settings=settings, progress=False)  # a size no other test uses: 3 x 11 tokens
    assert len(shared.block.compile_cache) == before + 2  # merged and full, not one per step
    pipe(PROMPT, seed=1, settings=settings, progress=False)
    assert len(shared.block.compile_cache) == before + 2
    assert first.images[0].size == (11 * m, 3 * m) and np.isfinite(first.latents).all()
    times = [t for t, _ in recorder.calls]
    assert [merged for _, merged in recorder.calls] == [t < 0.5 for t in times]
    assert any(t < 0.5 for t in times) and any(t >= 0.5 for t in times)  # both kinds of evaluation ran


def test_whole_model_graph_gives_the_shared_block_latents(pipe):
    """Context Drop in some layers through ``NextDiT.construct`` (one whole-model graph) and the shared block."""
    ms.set_context(mode=ms.GRAPH_MODE)
    whole = TextToImagePipeline(pipe.transformer, pipe.text_encoder, pipe.tokenizer, pipe.vae, pipe.train_size,
                                shared_block=False)  # fmt: skip
    assert whole.denoiser() is pipe.transformer
    fields = {"context_drop": 3, "context_drop_until": 0.6, "context_drop_layers": "1-2"}
    some = _latents(pipe, **fields)
    np.testing.assert_array_equal(_latents(whole, **fields), some)
    assert rel_err(some, _latents(pipe, **{**fields, "context_drop_layers": "all"})) > 1e-4  # the layers matter


# ------------------------------------------------------------------------------------------------------------------
# Settings and the command line
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"context_drop": 0}, "context_drop must be an integer >= 1 (1 = off), got 0"),
        ({"context_drop": 2.0}, "context_drop must be an integer >= 1"),
        ({"context_drop": True}, "context_drop must be an integer >= 1"),
        ({"context_drop_until": 1.5}, "context_drop_until must be in [0, 1], got 1.5"),
        ({"context_drop_until": float("nan")}, "context_drop_until must be in [0, 1], got nan"),
        ({"context_drop_layers": "first"}, "context_drop_layers: expected 'all' or layer indices"),
        ({"context_drop_layers": "1,"}, "context_drop_layers: expected 'all' or layer indices"),
        ({"context_drop_layers": "4-2"}, "context_drop_layers: range '4-2' runs backwards"),
    ],
)
def test_bad_settings_are_named(fields, message):
    with pytest.raises(ValueError) as error:
        SampleSettings(**fields).validate(1)
    assert message in str(error.value)


def test_layers_beyond_the_model_fail_before_any_work(pipe, monkeypatch):
    depth = pipe.transformer.cfg.n_layers
    monkeypatch.setattr(pipe, "encode_prompts", None)  # reached only if the check came too late
    with pytest.raises(ValueError, match=rf"context_drop_layers: '0,{depth}' names layer {depth}, but the model has"):
        pipe(PROMPT, settings=SampleSettings(context_drop=2, context_drop_layers=f"0,{depth}"), progress=False)


def test_sample_cli_flags_reach_the_png_metadata(tmp_path):
    sample = load_tool("sample")
    out = tmp_path / "image.png"
    sample.main(["--prompt", PROMPT, "--steps", "2", "--solver", "euler", "--mode", "pynative", "--out", str(out),
                 "--context-drop", "2", "--context-drop-until", "0.75", "--context-drop-layers", "0-1"])  # fmt: skip
    from PIL import Image

    with Image.open(out) as image:
        settings = json.loads(image.text["settings"])
    assert (settings["context_drop"], settings["context_drop_until"], settings["context_drop_layers"]) == (
        2, 0.75, "0-1")  # fmt: skip
    defaults = sample.parser().parse_args(["--prompt", "x"])
    assert (defaults.context_drop, defaults.context_drop_until, defaults.context_drop_layers) == (None, None, None)
