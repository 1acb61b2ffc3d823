"""RoPE tables and rotation against the original complex formulation (Lumina-T2X ``precompute_freqs_cis`` and
``apply_rotary_emb``, re-typed below in torch without ``.cuda()``) and the smooth paper formula's endpoints."""

import math

import numpy as np
import pytest
import torch
from conftest import rel_err

import mindspore as ms
from mindspore import Tensor

from mindone_lumina import rope


def original_precompute_freqs_cis(dim, end, theta=10000.0, scale_factor=1.0, scale_watershed=1.0, timestep=1.0):
    """lumina_next_t2i_mini/models/nextdit.py::NextDiT.precompute_freqs_cis, on CPU."""
    if timestep < scale_watershed:
        linear_factor, ntk_factor = scale_factor, 1.0
    else:
        linear_factor, ntk_factor = 1.0, scale_factor
    theta = theta * ntk_factor
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4)[: (dim // 4)].float() / dim)) / linear_factor
    t = torch.arange(end, dtype=torch.float)
    freqs = torch.outer(t, freqs).float()
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
    freqs_cis_h = freqs_cis.view(end, 1, dim // 4, 1).repeat(1, end, 1, 1)
    freqs_cis_w = freqs_cis.view(1, end, dim // 4, 1).repeat(end, 1, 1, 1)
    return torch.cat([freqs_cis_h, freqs_cis_w], dim=-1).flatten(2)


@pytest.mark.parametrize(
    "head_dim, scale, watershed, timestep",
    [(72, 1.0, 1.0, 1.0), (72, 2.0, 0.3, 0.1), (72, 2.0, 0.3, 0.7), (16, 1.5, 0.3, 0.3), (64, 1.41, 1.0, 0.99)],
)
def test_table_matches_original(head_dim, scale, watershed, timestep):
    gh, gw = 24, 40
    ref = original_precompute_freqs_cis(head_dim, 64, 10000.0, scale, watershed, timestep)[:gh, :gw].flatten(0, 1)
    cos, sin = rope.nextdit_rope(head_dim, gh, gw, scale, watershed, timestep)
    assert cos.shape == (gh * gw, head_dim // 2) and cos.dtype == np.float32
    # the original computes angles in fp32, these in fp64: the difference is fp32 rounding of angles up to ~63 rad
    assert np.abs(cos - ref.real.numpy()).max() < 2e-5
    assert np.abs(sin - ref.imag.numpy()).max() < 2e-5


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
