"""RoPE tables and rotation against the original Lumina-T2X ``precompute_freqs_cis`` (outputs recorded by
tests/fixtures/make_fixtures.py in fixtures/original-rope: Next-DiT's hard switch, the smooth ``ntk_v3`` variant and
Flag-DiT's 1-D table) and diffusers' ``get_2d_rotary_pos_embed_lumina`` run live, the smooth paper formula's
endpoints, and the complex rotation."""

import json
import math
import os

import numpy as np
import pytest
from conftest import FIXTURES, rel_err
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

import mindspore as ms
from mindspore import Tensor

from mindone_lumina import rope

ORIGINAL = os.path.join(FIXTURES, "original-rope")
with open(os.path.join(ORIGINAL, "rope_cases.json")) as _f:
    CASES = json.load(_f)
with np.load(os.path.join(ORIGINAL, "rope.npz")) as _z:
    TABLES = {k: _z[k] for k in _z.files}


def table_of(case):
    """The original's recorded complex table of a case (complex128)."""
    return TABLES[f"{case['key']}_real"].astype(np.float64) + 1j * TABLES[f"{case['key']}_imag"]


def find_case(kind, **params):
    found = [c for c in CASES[kind] if all(c[k] == v for k, v in params.items())]
    assert len(found) == 1, f"fixtures/original-rope has no {kind} case {params}: rerun make_fixtures.py"
    return found[0]


def _case_id(case):
    return "-".join(str(v) for k, v in case.items() if k not in ("key", "grid", "end", "stride"))


@pytest.mark.parametrize(
    "head_dim, scale, watershed, timestep",
    [(72, 1.0, 1.0, 1.0), (72, 2.0, 0.3, 0.1), (72, 2.0, 0.3, 0.7), (16, 1.5, 0.3, 0.3), (64, 1.41, 1.0, 0.99)],
)
def test_table_matches_original(head_dim, scale, watershed, timestep):
    """No scaling, PI (t < watershed) and NTK (t >= watershed) against the original's recorded table and diffusers."""
    case = find_case("nextdit", head_dim=head_dim, scale_factor=scale, scale_watershed=watershed, timestep=timestep)
    table = table_of(case)
    gh, gw = case["grid"]  # 24 x 40 patches of the original's table
    linear, ntk = (scale, 1.0) if timestep < watershed else (1.0, scale)  # the original's switch, as diffusers takes it
    live = get_2d_rotary_pos_embed_lumina(head_dim, gh, gw, linear_factor=linear, ntk_factor=ntk).numpy()
    assert np.abs(live - table).max() <= 1e-6  # the two references agree (measured: bit for bit)
    cos, sin = rope.nextdit_rope(head_dim, gh, gw, scale, watershed, timestep)
    assert cos.shape == (gh * gw, head_dim // 2) and cos.dtype == np.float32
    # the original computes angles in fp32, these in fp64: the difference is fp32 rounding of angles up to ~39 rad
    for ref in (table.reshape(gh * gw, -1), live.reshape(gh * gw, -1)):
        assert np.abs(cos - ref.real).max() < 2e-5
        assert np.abs(sin - ref.imag).max() < 2e-5


@pytest.mark.parametrize("case", CASES["smooth"], ids=_case_id)
def test_smooth_table_matches_original_ntk_v3(case):
    """The smooth variant against the original ``ntk_v3`` branch (visual_anagrams): frequencies within 1e-6
    relative (read off row 1 of the table), cos/sin within 2e-6 (measured <= 5.1e-7)."""
    table = table_of(case)
    (gh, gw), d, s, t = case["grid"], case["head_dim"], case["scale_factor"], case["timestep"]
    freqs = rope.smooth_time_aware_frequencies(d, s, t)
    original_freqs = np.angle(table[1, 0, 0::2])  # slot 2k of row 1 is e^(i omega_k); every omega_k < pi
    assert np.abs(freqs / original_freqs - 1).max() <= 1e-6
    cos, sin = rope.nextdit_rope(d, gh, gw, s, timestep=t, smooth=True)
    assert cos.shape == (gh * gw, d // 2) and cos.dtype == np.float32
    assert np.abs(cos - table.reshape(gh * gw, -1).real).max() <= 2e-6
    assert np.abs(sin - table.reshape(gh * gw, -1).imag).max() <= 2e-6


@pytest.mark.parametrize("case", CASES["flagdit"], ids=_case_id)
def test_flagdit_table_matches_original(case):
    """Flag-DiT's 1-D table against the original lumina_t2i one (every 16th of 4160 positions, 1024^2): equal up to
    the original's float32 rounding of frequencies and angles (<= 2e-7 of each angle, as in test_flagdit)."""
    d, factor, ntk, end, stride = (case[k] for k in ("head_dim", "rope_scaling_factor", "ntk_factor", "end", "stride"))
    table = table_of(case)
    cos, sin = rope.flagdit_rope(d, end, factor, ntk)
    positions = np.arange(end)[::stride]
    assert table.shape == (len(positions), d // 2)
    freqs = 1.0 / (10000.0 * ntk) ** (np.arange(0, d, 2) / d)
    bound = 2e-6 + 2.5e-7 * np.outer(positions / factor, freqs)  # (L, D/2), grows with the angle
    assert (np.abs(cos[positions] - table.real) <= bound).all()
    assert (np.abs(sin[positions] - table.imag) <= bound).all()


def test_recorded_cases_cover_the_switch():
    """The recorded Next-DiT cases include unscaled, PI and NTK tables, and the smooth ones both endpoints."""
    branches = {"unscaled" if c["scale_factor"] == 1 else "pi" if c["timestep"] < c["scale_watershed"] else "ntk"
                for c in CASES["nextdit"]}  # fmt: skip
    assert branches == {"unscaled", "pi", "ntk"}
    assert {0.0, 1.0} <= {c["timestep"] for c in CASES["smooth"]}
    assert {16, 72} <= {c["head_dim"] for c in CASES["smooth"]}


def test_apply_rope_equals_complex_product(pynative):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 3, 16)).astype(np.float32)  # (B, L, N, D)
    cos, sin = rope.nextdit_rope(16, 3, 4, 1.5, 0.5, 0.2)
    ms_out = rope.apply_rope(Tensor(x), Tensor(cos), Tensor(sin)).asnumpy()
    z = x[..., 0::2] + 1j * x[..., 1::2]
    rot = z * (cos + 1j * sin)[None, :, None, :]
    expected = np.stack([rot.real, rot.imag], axis=-1).reshape(x.shape)
    assert rel_err(ms_out, expected) < 1e-6


def test_apply_rope_is_bitwise_the_pair_formula(mode):
    """The whole-vector form (x * C + swap(x) * S) gives exactly re*cos - im*sin, re*sin + im*cos in fp32."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 20, 3, 8)).astype(np.float32)
    cos, sin = rope.nextdit_rope(8, 4, 5, 2.0, 0.3, 0.7)
    run = ms.jit(rope.apply_rope) if mode == "graph" else rope.apply_rope
    out = run(Tensor(x), Tensor(cos), Tensor(sin)).asnumpy()
    re, im = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    expected = np.stack([re * c - im * s, re * s + im * c], axis=-1).reshape(x.shape)
    assert np.array_equal(out, expected)


def test_apply_rope_keeps_fp16(pynative):
    x = np.random.default_rng(1).standard_normal((1, 4, 2, 8)).astype(np.float16)
    cos, sin = rope.nextdit_rope(8, 2, 2)
    out = rope.apply_rope(Tensor(x), Tensor(cos), Tensor(sin))
    assert out.dtype == ms.float16


def test_row_and_column_slots():
    """Slot 2k rotates with the row index, slot 2k+1 with the column index, both at omega_k = 1e4^(-4k/D)."""
    cos, sin = rope.nextdit_rope(8, 3, 5)
    omega1 = 10000.0 ** (-4 / 8)
    expected = np.array([2.0, 4.0, 2 * omega1, 4 * omega1])  # token (row 2, col 4)
    assert np.allclose(cos.reshape(3, 5, 4)[2, 4], np.cos(expected), atol=1e-6)
    assert np.allclose(sin.reshape(3, 5, 4)[2, 4], np.sin(expected), atol=1e-6)


def test_smooth_formula_endpoints():
    d, s = 72, 2.0
    base = rope.frequencies(d)
    at0 = rope.smooth_time_aware_frequencies(d, s, 0.0)
    at1 = rope.smooth_time_aware_frequencies(d, s, 1.0)
    assert np.allclose(at0[1:], base[1:] / s) and np.isclose(at0[0], base[0])  # PI except the highest frequency
    assert np.allclose(at1, np.maximum(rope.frequencies(d, ntk_factor=s), base / s))  # NTK with theta * s
    mid = rope.smooth_time_aware_frequencies(d, s, 0.5)
    assert np.all(mid >= base / s - 1e-15) and np.all(mid <= base + 1e-15)


def test_proportional_attention_gain():
    assert rope.proportional_attention_gain(4096, None) == 1.0
    assert math.isclose(rope.proportional_attention_gain(4096, 4096), 1.0)
    assert math.isclose(rope.proportional_attention_gain(16384, 4096) ** 2, 7 / 6)  # 2048^2 at base 1024^2


def test_bad_rope_arguments():
    with pytest.raises(ValueError, match="head_dim divisible by 4"):
        rope.frequencies(18)
    with pytest.raises(ValueError, match="exceeds the 384x384"):
        rope.nextdit_rope(72, 400, 10)
    with pytest.raises(ValueError, match="scale_factor must be positive"):
        rope.nextdit_rope(72, 4, 4, scale_factor=0.0)
