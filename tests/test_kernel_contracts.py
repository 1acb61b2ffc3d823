"""The NumPy emulators of the fused Ascend kernels (``kernel_contracts.py``) against direct NumPy attention, RMS norm
and rotation written here independently (float64, per head / per pair, explicit index conditions), their refusals, and
the backend's fused preparation with the emulators against the portable path (``kernel_contracts.check`` and a tiny
Next-DiT run with the emulators patched in for the kernels)."""

import ml_dtypes
import numpy as np
import pytest
from conftest import BUDGETS, rel_err

import mindspore as ms
from mindspore import Tensor, mint, ops

from mindone_lumina import backend, rope
from mindone_lumina import kernel_contracts as kc
from mindone_lumina.models import nextdit
from mindone_lumina.models.dit_blocks import Attention
from mindone_lumina.models.layers import RMSNorm, cast_parameters

CAUSAL_2048 = np.triu(np.ones((2048, 2048), bool), 1)  # the compressed mask of sparse modes 2-4 (True = discard)


def direct_attention(q, k, v, keep, scale):
    """Softmax attention in float64, one query head at a time: q (B, N1, S1, D), k/v (B, N2, S2, D), keep
    broadcastable to (B, N1, S1, S2) (True = attend) or None. Query head h reads kv head h // (N1 / N2)."""
    b, n1, s1, _ = q.shape
    n2, s2 = k.shape[1], k.shape[2]
    keep = np.ones((b, n1, s1, s2), bool) if keep is None else np.broadcast_to(keep, (b, n1, s1, s2))
    out = np.zeros(q.shape[:3] + (v.shape[3],))
    for h in range(n1):
        g = h // (n1 // n2)
        scores = scale * np.einsum("bid,bjd->bij", q[:, h].astype(np.float64), k[:, g].astype(np.float64))
        scores = np.where(keep[:, h], scores, -np.inf)
        with np.errstate(invalid="ignore"):  # a row without keys is NaN: undefined
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out[:, h] = (p / p.sum(axis=-1, keepdims=True)) @ v[:, g].astype(np.float64)
    return out


def qkv(rng, b=2, n1=4, n2=2, s1=5, s2=8, d=32, dtype=np.float16):
    """Random (B, N, S, D) queries, keys and values in ``dtype``."""
    q = rng.standard_normal((b, n1, s1, d)).astype(dtype)
    k, v = (rng.standard_normal((b, n2, s2, d)).astype(dtype) for _ in range(2))
    return q, k, v


def to_layout(x, layout):
    """(B, N, S, D) -> ``layout``."""
    if layout == "BNSD":
        return x
    bsnd = x.transpose(0, 2, 1, 3)
    if layout == "BSND":
        return bsnd
    bsh = bsnd.reshape(bsnd.shape[0], bsnd.shape[1], -1)
    return bsh if layout == "BSH" else bsh.transpose(1, 0, 2)


def from_layout(x, layout, heads):
    if layout == "BNSD":
        return x
    if layout in ("BSH", "SBH"):
        x = x if layout == "BSH" else x.transpose(1, 0, 2)
        x = x.reshape(x.shape[0], x.shape[1], heads, -1)
    return x.transpose(0, 2, 1, 3)


@pytest.mark.parametrize("layout", ["BSH", "BNSD", "SBH", "BSND"])
def test_attention_in_every_layout_equals_direct_attention(pynative, layout):
    """GQA 4:2, a (B, 1, S1, S2) discard mask and a scale: every layout gives the BNSD result, equal to direct
    attention to fp16 rounding; the output keeps the dtype and layout of the query."""
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng)
    discard = rng.random((2, 1, 5, 8)) < 0.3
    discard[..., 0] = False  # every query keeps a key
    run = lambda lay: kc.flash_attention_score(  # noqa: E731
        *(Tensor(to_layout(a, lay)) for a in (q, k, v)), 4, attn_mask=Tensor(discard), scalar_value=0.25,
        input_layout=lay)  # fmt: skip
    out = run(layout)
    assert out.dtype == ms.float16 and out.shape == to_layout(q, layout).shape
    got = from_layout(out.asnumpy(), layout, 4)
    assert np.array_equal(got, run("BNSD").asnumpy())
    assert rel_err(got, direct_attention(q, k, v, ~discard, 0.25)) < 1e-3


def test_gqa_query_head_reads_kv_head_h_over_group(pynative):
    """Values constant per kv head (kv head g holds g + 1): query head h returns h // (N1 / N2) + 1 exactly."""
    rng = np.random.default_rng(1)
    q, k, _ = qkv(rng, n1=6, n2=3)
    v = np.broadcast_to(np.arange(1, 4, dtype=np.float16)[None, :, None, None], k.shape).copy()
    out = kc.flash_attention_score(Tensor(q), Tensor(k), Tensor(v), 6, input_layout="BNSD").asnumpy()
    assert np.array_equal(out, np.broadcast_to(np.array([1, 1, 2, 2, 3, 3], np.float16)[None, :, None, None], q.shape))


def test_mask_polarity_dtypes_and_shapes(pynative):
    """1/True discards: a discarded key's value has no effect; bool and uint8 masks, and the shapes (B, N1, S1, S2),
    (B, 1, S1, S2) and (S1, S2) of one mask, give one result."""
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, b=2, n1=2, n2=2, s1=4, s2=6)
    discard = np.zeros((4, 6), bool)
    discard[:, 2] = True  # key 2 discarded for every query
    run = lambda vv, m: kc.flash_attention_score(  # noqa: E731
        Tensor(q), Tensor(k), Tensor(vv), 2, attn_mask=Tensor(m), input_layout="BNSD").asnumpy()  # fmt: skip
    base = run(v, discard)
    v2 = v.copy()
    v2[:, :, 2] = 100
    assert np.array_equal(run(v2, discard), base)
    keep_all = np.zeros_like(discard)
    assert not np.array_equal(run(v2, keep_all), run(v, keep_all))  # kept, the key matters
    for mask in (
        discard.astype(np.uint8),
        np.broadcast_to(discard, (2, 1, 4, 6)),
        np.broadcast_to(discard, (2, 2, 4, 6)),
    ):
        assert np.array_equal(run(v, np.ascontiguousarray(mask)), base)
    assert rel_err(base, direct_attention(q, k, v, ~discard, 1.0)) < 1e-3


def band(s1, s2, low, high):
    """keep[i, j] for low(i) <= j <= high(i), written as loops."""
    keep = np.zeros((s1, s2), bool)
    for i in range(s1):
        for j in range(s2):
            keep[i, j] = low(i) <= j <= high(i)
    return keep


@pytest.mark.parametrize(
    "mode, pre, nxt, s1, s2, expected",
    [
        (0, 2, 1, 6, 6, lambda s1, s2: band(s1, s2, lambda i: i - 2, lambda i: i + 1)),  # band, origin top left
        (0, 3, -1, 5, 7, lambda s1, s2: band(s1, s2, lambda i: i - 3, lambda i: i - 1)),  # negative next_tokens
        (1, 0, 0, 5, 7, lambda s1, s2: np.ones((s1, s2), bool)),  # allMask: pre/next ignored
        (2, 0, 0, 5, 7, lambda s1, s2: band(s1, s2, lambda i: 0, lambda i: i)),  # leftUpCausal
        (3, 0, 0, 5, 7, lambda s1, s2: band(s1, s2, lambda i: 0, lambda i: i + s2 - s1)),  # rightDownCausal
        (4, 1, 0, 5, 7, lambda s1, s2: band(s1, s2, lambda i: i + s2 - s1 - 1, lambda i: i + s2 - s1)),  # band, BR
    ],
)
def test_sparse_modes(pynative, mode, pre, nxt, s1, s2, expected):
    """Each sparse mode keeps the documented positions: modes 0/1 with a full all-keep mask (mode 0 cut to the
    pre/next band), modes 2-4 with the compressed 2048 x 2048 causal mask."""
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, b=1, n1=2, n2=1, s1=s1, s2=s2, d=16)
    mask = CAUSAL_2048 if mode >= 2 else np.zeros((s1, s2), bool)
    out = kc.flash_attention_score(Tensor(q), Tensor(k), Tensor(v), 2, attn_mask=Tensor(mask), pre_tokens=pre,
                                   next_tokens=nxt, input_layout="BNSD", sparse_mode=mode).asnumpy()  # fmt: skip
    keep = expected(s1, s2)
    rows = keep.any(axis=1)  # a negative next_tokens empties the first rows: see test_fully_masked_row_...
    assert rel_err(out[:, :, rows], direct_attention(q, k, v, keep, 1.0)[:, :, rows]) < 1e-3
    without_mask = kc.flash_attention_score(Tensor(q), Tensor(k), Tensor(v), 2, pre_tokens=pre, next_tokens=nxt,
                                            input_layout="BNSD", sparse_mode=mode).asnumpy()  # fmt: skip
    assert rel_err(without_mask, direct_attention(q, k, v, None, 1.0)) < 1e-3  # no mask: the mode has no effect


def test_fully_masked_row_averages_all_values(pynative):
    """The emulator's stated assumption for a row whose every key is discarded (undocumented): the uniform mean of
    the values, as a kernel that fills discarded scores with a large negative number computes; other rows as usual."""
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, b=1, n1=1, n2=1, s1=3, s2=5, d=16)
    discard = np.zeros((3, 5), bool)
    discard[1] = True
    out = kc.flash_attention_score(Tensor(q), Tensor(k), Tensor(v), 1, attn_mask=Tensor(discard),
                                   input_layout="BNSD").asnumpy().astype(np.float64)  # fmt: skip
    np.testing.assert_allclose(out[0, 0, 1], v[0, 0].astype(np.float64).mean(axis=0), rtol=0, atol=2e-3)
    want = direct_attention(q, k, v, ~discard, 1.0)
    assert rel_err(out[0, 0, [0, 2]], want[0, 0, [0, 2]]) < 1e-3


def test_bf16_attention(pynative):
    rng = np.random.default_rng(5)
    q, k, v = (a.astype(ml_dtypes.bfloat16) for a in qkv(rng, dtype=np.float32))
    out = kc.flash_attention_score(Tensor(q), Tensor(k), Tensor(v), 4, scalar_value=0.5, input_layout="BNSD")
    assert out.dtype == ms.bfloat16
    assert rel_err(out.astype(ms.float32).asnumpy(), direct_attention(q, k, v, None, 0.5)) < 8e-3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"query": np.float32}, "float16 or bfloat16"),
        ({"d": 72}, "multiple of 16"),
        ({"d": 528}, "at most 512"),
        ({"input_layout": "TND"}, "TND"),
        ({"input_layout": "NSD"}, "not one of"),
        ({"keep_prob": 0.9}, "dropout"),
        ({"real_shift": np.zeros((1, 4, 5, 8), np.float16)}, "real_shift"),
        ({"sparse_mode": 5}, "prefix"),
        ({"sparse_mode": 6}, "not implemented"),
        ({"n2": 3}, "multiple of key/value heads"),
        ({"head_num": 2}, "differs from the 4 heads"),
        ({"attn_mask": np.zeros((5, 8), np.float16)}, "bool or uint8"),
        ({"attn_mask": np.full((5, 8), 2, np.uint8)}, "other than 0 and 1"),
        ({"attn_mask": np.zeros((1, 1, 5, 8), bool)}, "attn_mask shape"),
        ({"attn_mask": np.zeros((5, 8), bool), "sparse_mode": 2}, "compressed causal"),
        ({"attn_mask": ~CAUSAL_2048, "sparse_mode": 3}, "compressed causal"),
        ({"attn_mask": np.zeros((5, 8), bool), "pre_tokens": -1, "next_tokens": -1}, "both negative"),
        ({"attn_mask": np.zeros((5, 8), bool), "pre_tokens": 2, "next_tokens": -3}, "next_tokens -3 < 0"),
        ({"inner_precise": 2}, "inner_precise"),
    ],
)
def test_attention_refusals(pynative, change, message):
    """What [MS] 2.10 refuses or leaves undefined, and what is not emulated, raises ValueError naming it."""
    change = dict(change)
    q, k, v = qkv(np.random.default_rng(6), n2=change.pop("n2", 2), d=change.pop("d", 32))
    if "query" in change:
        dtype = change.pop("query")
        q, k, v = (a.astype(dtype) for a in (q, k, v))
    kwargs = {"input_layout": "BNSD", **change}
    head_num = kwargs.pop("head_num", 4)
    with pytest.raises(ValueError, match=message):
        kc.flash_attention_score(Tensor(q), Tensor(k), Tensor(v), head_num, **kwargs)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("gamma_shape", [(16,), (3, 16)])
def test_rms_norm_equals_direct_formula(pynative, dtype, gamma_shape):
    """``y = x / sqrt(mean(x^2) + eps) * gamma`` over gamma's axes in float64; rstd float32 shaped as x with gamma's
    axes 1; y in the dtype of x, one rounding away from the exact value."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 16)).astype(dtype)
    gamma = (1 + 0.1 * rng.standard_normal(gamma_shape)).astype(dtype)
    y, rstd = kc.rms_norm(Tensor(x), Tensor(gamma), 1e-5)
    axes = tuple(range(3 - len(gamma_shape), 3))
    x64 = x.astype(np.float64)
    want_rstd = 1 / np.sqrt((x64**2).mean(axis=axes, keepdims=True) + 1e-5)
    assert rstd.dtype == ms.float32 and rstd.shape == want_rstd.shape
    assert y.dtype == Tensor(x).dtype and y.shape == x.shape
    np.testing.assert_allclose(rstd.asnumpy(), want_rstd, rtol=1e-6)
    u = {np.float16: 2.0**-11, ml_dtypes.bfloat16: 2.0**-8, np.float32: 2.0**-24}[dtype]
    assert rel_err(y.astype(ms.float32).asnumpy(), x64 * want_rstd * gamma.astype(np.float64)) < u


@pytest.mark.parametrize(
    "x_dtype, gamma, epsilon, message",
    [
        (np.float16, np.ones(16, np.float32), 1e-6, "differs from the dtype of x"),
        (np.int32, np.ones(16, np.int32), 1e-6, "NumPy dtype int32"),
        (np.float32, np.ones(16, np.float32), 0.0, r"not in \(0, 1\]"),
        (np.float32, np.ones(8, np.float32), 1e-6, "not a trailing part"),
        (np.float32, np.ones((4, 2, 3, 16), np.float32), 1e-6, "not a trailing part"),
    ],
)
def test_rms_norm_refusals(pynative, x_dtype, gamma, epsilon, message):
    with pytest.raises(ValueError, match=message):
        kc.rms_norm(np.ones((2, 3, 16), x_dtype), gamma, epsilon)


def direct_rotation(x, cos, sin, mode):
    """``x * cos + rotate(x) * sin`` element by element along D, in float64 (x, cos, sin broadcast together)."""
    x, cos, sin = np.broadcast_arrays(*(a.astype(np.float64) for a in (x, cos, sin)))
    d, y = x.shape[-1], np.empty(x.shape)
    for m in range(d):
        if mode == 0:  # rotate_half: the partner of m is m +- D/2, with a minus on the first half
            partner = -x[..., m + d // 2] if m < d // 2 else x[..., m - d // 2]
        else:  # interleaved: the partner of 2k is -x[2k+1], of 2k+1 is x[2k]
            partner = -x[..., m + 1] if m % 2 == 0 else x[..., m - 1]
        y[..., m] = x[..., m] * cos[..., m] + partner * sin[..., m]
    return y


@pytest.mark.parametrize(
    "mode, x_shape, cos_shape",
    [
        (1, (2, 6, 3, 8), (1, 6, 1, 8)),  # BSND x, 1S1D tables
        (1, (2, 3, 6, 8), (1, 1, 6, 8)),  # BNSD, 11SD
        (1, (6, 2, 3, 8), (6, 1, 1, 8)),  # SBND, S11D
        (0, (2, 6, 3, 8), (2, 6, 1, 8)),  # BSND, BS1D (rotate_half only)
        (0, (2, 3, 6, 8), (2, 3, 6, 8)),  # BNSD, BNSD
    ],
)
def test_rotary_equals_direct_rotation(pynative, mode, x_shape, cos_shape):
    rng = np.random.default_rng(8)
    x = rng.standard_normal(x_shape).astype(np.float32)
    angles = rng.uniform(-3, 3, cos_shape)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    out = kc.rotary_position_embedding(Tensor(x), Tensor(cos), Tensor(sin), mode).asnumpy()
    assert out.dtype == np.float32 and out.shape == x_shape
    assert rel_err(out, direct_rotation(x, cos, sin, mode)) < 1e-6
    half = kc.rotary_position_embedding(*(Tensor(a.astype(np.float16)) for a in (x, cos, sin)), mode)
    assert half.dtype == ms.float16
    assert rel_err(half.asnumpy(), direct_rotation(*(a.astype(np.float16) for a in (x, cos, sin)), mode)) < 2.0**-11


@pytest.mark.parametrize(
    "x_shape, cos_shape, mode, message",
    [
        ((2, 3, 6, 8), (2, 1, 6, 8), 1, "fits no documented layout"),  # B1SD: rotate_half only
        ((2, 6, 3, 8), (6, 8), 1, "must be 4-D"),
        ((2, 6, 3, 7), (1, 6, 1, 7), 1, "even D"),
        ((2, 6, 3, 8), (1, 6, 1, 8), 2, "mode 2"),
        ((40, 6, 25, 8), (1, 6, 1, 8), 1, r"B \* N < 1000"),
        ((1, 1000, 1, 8), (1, 1, 1, 8), 0, "B, N < 1000"),
        ((4, 4, 1, 16), (1, 1, 1, 16), 0, "not callable"),  # BNSD, B * N = 16 > 8 S = 8, 64-byte rows
    ],
)
def test_rotary_refusals(pynative, x_shape, cos_shape, mode, message):
    table = np.zeros(cos_shape, np.float32)
    with pytest.raises(ValueError, match=message):
        kc.rotary_position_embedding(np.zeros(x_shape, np.float32), table, table, mode)
    with pytest.raises(ValueError, match="must have the dtype of x"):
        kc.rotary_position_embedding(np.zeros((2, 6, 3, 8), np.float16), *(np.zeros((1, 6, 1, 8), np.float32),) * 2)


@pytest.mark.parametrize("dtype", [ms.float32, ms.float16])
def test_fused_rope_with_the_emulator_is_rope_apply_rope(pynative, dtype):
    """The fused preparation (fp32 x, (1, L, 1, D) tables, interleaved mode) gives ``rope.apply_rope`` bit for bit;
    ``backend.apply_rope`` without ``fused`` is ``rope.apply_rope``."""
    x = Tensor(np.random.default_rng(9).standard_normal((2, 20, 3, 72)).astype(np.float32)).astype(dtype)
    cos, sin = (Tensor(t) for t in rope.nextdit_rope(72, 4, 5, 2.0, 0.3, 0.7))
    want = rope.apply_rope(x, cos, sin).asnumpy()
    fused = backend.fused_rope(x, cos, sin, kernel=kc.rotary_position_embedding)
    assert fused.dtype == dtype
    assert np.array_equal(fused.asnumpy(), want)
    assert np.array_equal(backend.apply_rope(x, cos, sin).asnumpy(), want)


def test_check_rows_pass_and_the_mode_is_restored():
    """``check()`` covers the three kernels (attention in fp16, bf16 and fp32 inputs), every row within its budget;
    it runs in PyNative and gives the caller's graph mode back; real kernels need an Ascend device."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rows = kc.check()
    assert ms.get_context("mode") == ms.GRAPH_MODE
    failed = [r for r in rows if not r.passed]
    assert not failed, failed
    assert {r.kernel for r in rows} == {"flash_attention_score", "rms_norm", "rotary_position_embedding"}
    assert sum(r.kernel == "flash_attention_score" for r in rows) >= 5
    assert all(0 <= r.error <= r.budget < 0.02 for r in rows)
    with pytest.raises(ValueError, match="needs an Ascend device"):
        kc.check(real_kernels=True)
    assert ms.get_context("mode") == ms.GRAPH_MODE


def _without_scale(real):
    return lambda q, k, v, key_mask, scale, attn_mask=None, kernel=None: real(q, k, v, key_mask, 1.0, attn_mask, kernel)


def _rotate_half_mode(real):
    return lambda x, cos, sin, kernel=None: real(x, cos, sin, kernel=lambda x, c, s, mode: kernel(x, c, s, 0))


def _without_weight(real):
    return lambda x, weight, eps, kernel=None: real(x, mint.ones(weight.shape, dtype=weight.dtype), eps, kernel)


@pytest.mark.parametrize(
    "function, sabotage, kernel",
    [
        ("flash_attention", _without_scale, "flash_attention_score"),  # the kernel's default scale 1.0
        ("fused_rope", _rotate_half_mode, "rotary_position_embedding"),  # interleaved tables, rotate_half mode
        ("fused_rms_norm", _without_weight, "rms_norm"),
    ],
)
def test_check_catches_a_broken_preparation(pynative, monkeypatch, function, sabotage, kernel):
    """A fused preparation with a plausible mistake fails every row of its kernel, and only those."""
    monkeypatch.setattr(backend, function, sabotage(getattr(backend, function)))
    rows = kc.check()
    assert all(r.passed != (r.kernel == kernel) for r in rows), rows


def test_nextdit_with_fused_kernels_emulated_equals_the_portable_model(pynative, monkeypatch):
    """A Next-DiT block (head_dim 72, GQA 2:1, padded caption) with its attention, RoPE and RMSNorm switched to the
    fused path and the emulators standing in for the Ascend kernels: in fp16 it runs every kernel and equals the
    portable fp16 model within fp16 rounding; in fp32 attention keeps the portable path (the kernel takes no fp32)."""
    cfg = nextdit.resolve_config({"dim": 288, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16,
                                  "cap_feat_dim": 32, "qk_norm": True})  # fmt: skip
    model = nextdit.NextDiT(cfg)
    rng = np.random.default_rng(10)
    for name, p in model.parameters_and_names():  # non-zero gates and adaLN, so the attention reaches the output
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.1 + (1.0 if "norm" in name else 0.0)))
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = Tensor(np.array([0.3, 0.7], np.float32))
    cap = rng.standard_normal((2, 5, 32)).astype(np.float32)
    cap_mask = Tensor(np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32))
    reference = nextdit.forward(model, Tensor(x), t, Tensor(cap), cap_mask).asnumpy()  # portable fp32
    calls = []
    for name in ("flash_attention_score", "rms_norm", "rotary_position_embedding"):
        emulator = getattr(kc, name)
        monkeypatch.setattr(ops, name, lambda *a, _e=emulator, _n=name, **kw: calls.append(_n) or _e(*a, **kw))
    for _, cell in model.cells_and_names():
        if isinstance(cell, (Attention, RMSNorm)):
            cell.fused = True
    fused32 = nextdit.forward(model, Tensor(x), t, Tensor(cap), cap_mask).asnumpy()
    assert "flash_attention_score" not in calls and calls.count("rotary_position_embedding") == 2
    assert rel_err(fused32, reference) < 1e-6  # fp32 RMSNorm and RoPE kernels: fp32 rounding only
    calls.clear()
    cast_parameters(model, ms.float16)
    half = (Tensor(x).astype(ms.float16), t, Tensor(cap).astype(ms.float16), cap_mask)
    fused16 = nextdit.forward(model, *half).astype(ms.float32).asnumpy()
    assert calls.count("flash_attention_score") == 2 and calls.count("rotary_position_embedding") == 2
    assert calls.count("rms_norm") == 5  # four sandwich norms and the caption norm
    for _, cell in model.cells_and_names():
        if isinstance(cell, (Attention, RMSNorm)):
            cell.fused = False
    portable16 = nextdit.forward(model, *half).astype(ms.float32).asnumpy()
    # the two fp16 paths round at different places, each within the fp16 budget of the fp32 model
    assert 0 < rel_err(fused16, portable16) < 2e-3
    budget = BUDGETS["fp16"]["transformer"]
    assert rel_err(fused16, reference) < budget and rel_err(portable16, reference) < budget
