"""Rotary position embedding of the Lumina DiTs as real cos/sin tables: Next-DiT's 2-D RoPE with frequency- and
time-aware scaling, Flag-DiT's 1-D RoPE, and the proportional-attention gain.

Ported from Lumina-T2X ``lumina_next_t2i_mini/models/nextdit.py`` and ``lumina_t2i/models/model.py``
(``precompute_freqs_cis``, ``apply_rotary_emb``).
The original builds complex ``e^{iA}``; MindSpore cannot differentiate complex products, so these functions return
``cos A`` and ``sin A`` and ``apply_rope`` rotates adjacent pairs with real arithmetic. All tables are built on the
host in float64 and handed to the model as float32 inputs, so a new timestep never recompiles a graph.

Layout (head_dim D, k = 0..D/4-1): the head vector is D/2 complex slots ``x[2m] + i x[2m+1]``; slot ``2k`` rotates
with the row (height) index and slot ``2k+1`` with the column (width) index, both at frequency ``omega_k``.
"""

import math

import numpy as np

import mindspore as ms
from mindspore import Tensor, mint

THETA = 10000.0
_SWAP = Tensor(np.array([[0.0, 1.0], [1.0, 0.0]], np.float32))  # exchanges the two members of a pair (exactly)
MAX_GRID = 384  # Next-DiT precomputes 384 x 384 patch positions (6144 px per side)
FLAGDIT_LENGTH = 40000  # Flag-DiT precomputes 40000 positions (``precompute_freqs_cis(head_dim, 40000)``)


def frequencies(head_dim: int, theta: float = THETA, linear_factor: float = 1.0, ntk_factor: float = 1.0):
    """``omega_k = (theta * ntk)^(-4k / D) / linear`` for k = 0..D/4-1 (float64)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    k = np.arange(0, head_dim, 4, dtype=np.float64)[: head_dim // 4]
    return 1.0 / (theta * ntk_factor) ** (k / head_dim) / linear_factor


def time_aware_factors(scale_factor: float, scale_watershed: float, timestep: float):
    """The released hard switch: position interpolation while ``t < watershed`` (noisy phase), NTK after.

    Returns ``(linear_factor, ntk_factor)``; t follows the Lumina convention (0 = noise, 1 = data).
    """
    if timestep < scale_watershed:
        return scale_factor, 1.0
    return 1.0, scale_factor


def smooth_time_aware_frequencies(head_dim: int, scale_factor: float, timestep: float, theta: float = THETA):
    """The paper's smooth time-aware scaled RoPE (Lumina-T2X ``visual_anagrams`` ``ntk_v3``).

    ``theta_t = theta * s^(D / ((D - 1) t + 1))`` and ``omega = max(omega(theta_t), omega(theta) / s)``: position
    interpolation at t = 0 (except the highest frequency), NTK with ``theta * s`` at t = 1.
    """
    pi = frequencies(head_dim, theta, linear_factor=scale_factor)
    dim_t = timestep * (head_dim - 1) + 1
    ntk = frequencies(head_dim, theta * scale_factor ** (head_dim / dim_t))
    return np.maximum(pi, ntk)


def rope_table(freqs: np.ndarray, grid_h: int, grid_w: int):
    """cos/sin tables for a ``grid_h x grid_w`` patch grid in row-major token order.

    Returns two float32 arrays of shape (grid_h * grid_w, D/2) matching the original's
    ``freqs_cis[:grid_h, :grid_w].flatten(0, 1)``.
    """
    if grid_h > MAX_GRID or grid_w > MAX_GRID:
        raise ValueError(f"patch grid {grid_h}x{grid_w} exceeds the {MAX_GRID}x{MAX_GRID} RoPE table of Next-DiT")
    rows = np.arange(grid_h, dtype=np.float64)[:, None, None] * freqs  # (h, 1, D/4)
    cols = np.arange(grid_w, dtype=np.float64)[None, :, None] * freqs  # (1, w, D/4)
    rows, cols = np.broadcast_arrays(rows, cols)  # (h, w, D/4) each
    angles = np.stack([rows, cols], axis=-1).reshape(grid_h * grid_w, -1)  # (L, D/2): row, col interleaved
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def nextdit_rope(
    head_dim: int,
    grid_h: int,
    grid_w: int,
    scale_factor: float = 1.0,
    scale_watershed: float = 1.0,
    timestep: float = 1.0,
    smooth: bool = False,
):
    """The tables the original ``forward_with_cfg`` would use for this grid, scale and timestep."""
    if scale_factor <= 0:
        raise ValueError(f"scale_factor must be positive, got {scale_factor}")
    if smooth:
        freqs = smooth_time_aware_frequencies(head_dim, scale_factor, timestep)
    else:
        linear, ntk = time_aware_factors(scale_factor, scale_watershed, timestep)
        freqs = frequencies(head_dim, linear_factor=linear, ntk_factor=ntk)
    return rope_table(freqs, grid_h, grid_w)


def flagdit_rope(head_dim: int, seq_len: int, rope_scaling_factor: float = 1.0, ntk_factor: float = 1.0):
    """Flag-DiT's 1-D tables: cos/sin (L, head_dim/2) float32 of ``omega_k = (theta * ntk)^(-2k / D)`` at positions
    ``l / rope_scaling_factor`` (Lumina-T2X ``lumina_t2i/models/model.py`` ``precompute_freqs_cis(head_dim, 40000)``).

    Built in float64 like the 2-D tables. The original rounds frequencies and angles to float32 (its pow is not even
    correctly rounded), so its own angles are off by up to ~2e-7 of their size: 1e-4 rad at 4k tokens.
    """
    if seq_len > FLAGDIT_LENGTH:
        raise ValueError(f"{seq_len} tokens exceed the {FLAGDIT_LENGTH}-position RoPE table of Flag-DiT")
    if not (rope_scaling_factor > 0 and ntk_factor > 0):
        raise ValueError(f"RoPE factors must be positive, got {rope_scaling_factor} and ntk {ntk_factor}")
    exponent = np.arange(0, head_dim, 2, dtype=np.float64)[: head_dim // 2] / head_dim
    freqs = 1.0 / (THETA * ntk_factor) ** exponent  # (D/2,)
    angles = np.outer(np.arange(seq_len, dtype=np.float64) / rope_scaling_factor, freqs)  # (L, D/2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def proportional_attention_gain(seq_len: int, base_seqlen: int | None) -> float:
    """Factor on the softmax scale: ``sqrt(log_base(L))`` with proportional attention, else 1."""
    if base_seqlen is None:
        return 1.0
    if base_seqlen <= 1:
        raise ValueError(f"base_seqlen must be > 1, got {base_seqlen}")
    return math.sqrt(math.log(seq_len) / math.log(base_seqlen))


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs of ``x`` (B, L, N, D) by the angles of ``cos``/``sin`` (L, D/2), in fp32.

    Written as ``x * C + swap(x) * S`` on whole head vectors (``C`` = cos repeated per pair, ``S`` = (-sin, sin) per
    pair, ``swap`` exchanging the two members of each pair) rather than by slicing out the real and imaginary
    parts: strided slices, flips and their gradients are slow MindSpore CPU kernels. Each output element is the same
    product pair as ``re * cos - im * sin`` / ``re * sin + im * cos``, so the result is bitwise the same.
    """
    dtype = x.dtype
    b, seq, n, d = x.shape
    x = x.astype(ms.float32)
    swapped = mint.matmul(x.reshape(b, seq, n, d // 2, 2), _SWAP).reshape(b, seq, n, d)  # (im, re) per pair
    c = mint.broadcast_to(cos.unsqueeze(2), (seq, d // 2, 2)).reshape(1, seq, 1, d)
    s = mint.cat([-sin.unsqueeze(2), sin.unsqueeze(2)], dim=-1).reshape(1, seq, 1, d)
    return (x * c + swapped * s).astype(dtype)  # (B, L, N, D)
