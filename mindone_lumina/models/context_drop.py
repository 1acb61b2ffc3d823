"""Context Drop (Lumina-Next): self-attention over image tokens whose keys and values are merged over neighbouring
tokens, for a cheaper network evaluation in the early, noisy part of sampling.

The paper describes it in a few sentences and no implementation is public (not in Lumina-T2X, diffusers or mindone),
so the choices below are this project's (issue #26):

* Queries stay at full resolution. Keys and values of the image tokens are averaged over ``n x n`` cells of the
  row-major ``gh x gw`` token grid (``n``: the merge factor; 2 = 2x2 average pooling), so the self-attention scores
  shrink from L x L to L x S with L = gh gw and S = ceil(gh / n) ceil(gw / n).
* Keys are pooled after qk-norm and RoPE, "pooling the finished keys", the exact form: a merged key is the mean of
  its members' normalised, rotated keys, so it needs no position of its own, and its logit against a query is the
  mean of its members' logits. (Pooling before qk-norm and RoPE would be cheaper but would need a position for the
  merged token.)
* Values are pooled before the ``wv`` projection: a linear map without bias commutes with averaging, so this equals
  pooling after it, and the projection runs on S tokens instead of L.
* Caption tokens are never merged: the caption cross-attention is its own branch of ``dit_blocks.Attention`` and
  does not change. The proportional-attention gain still uses the full token count L (it is a ``construct`` input
  built from the grid, ``rope.proportional_attention_gain``).
* Any grid: a cell at the bottom or right edge of a grid that n does not divide averages only its real tokens. The
  pooling gathers each cell's n * n member rows and sums them with weights from two constant tables built on the
  host in NumPy (``merge_tables``): the member indices, and 1 / count for the cell's real members, 0 for the slots
  of a partial cell. That is zero padding divided by the per-cell count, without materialising a padded grid (an
  empty slot repeats a real member of its cell, at weight 0).
* Graph mode: the tables are ``construct`` inputs (``NextDiT``, ``SharedBlockNextDiT``), so a sampling run compiles
  at most two graphs per resolution (merged and full), never one per step, and the merge factor 1 (no tables) runs
  the unchanged code path. Which layers merge is a tuple of Python ints, a graph constant.

Next-DiT only: Flag-DiT's token sequence has an end-of-line token per row, which this grid pooling does not model.
"""

import math

import numpy as np

import mindspore as ms
from mindspore import Tensor, mint, ops


def merged_grid(grid_h: int, grid_w: int, factor: int) -> tuple:
    """(rows, columns) of merged cells: ``(ceil(grid_h / factor), ceil(grid_w / factor))``."""
    for name, value in (("grid_h", grid_h), ("grid_w", grid_w), ("factor", factor)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return math.ceil(grid_h / factor), math.ceil(grid_w / factor)


def merge_tables(grid_h: int, grid_w: int, factor: int) -> tuple:
    """The pooling tables of a row-major ``grid_h x grid_w`` token grid merged ``factor x factor``.

    Returns:
        index: (S, factor^2) int32, the token index of every slot of every cell (cells row-major, slots row-major
            inside a cell); a slot beyond the grid's edge repeats a real member of its cell.
        weight: (S, factor^2, 1) float32, 1 / (real members of the cell) for a real slot, 0 for an empty one; each
            cell's weights sum to 1.
    """
    cells_h, cells_w = merged_grid(grid_h, grid_w, factor)
    rows = np.arange(cells_h)[:, None] * factor + np.arange(factor)  # (Ch, n): grid row of each slot row
    cols = np.arange(cells_w)[:, None] * factor + np.arange(factor)  # (Cw, n)
    real = (rows[:, None, :, None] < grid_h) & (cols[None, :, None, :] < grid_w)  # (Ch, Cw, n, n)
    # clamped to the last real row / column, which lies in the same (partial) cell
    index = np.minimum(rows, grid_h - 1)[:, None, :, None] * grid_w + np.minimum(cols, grid_w - 1)[None, :, None, :]
    weight = real / real.sum(axis=(2, 3), keepdims=True)  # (Ch, Cw, n, n)
    k = factor * factor
    return index.reshape(-1, k).astype(np.int32), weight.reshape(-1, k, 1).astype(np.float32)


def merge_inputs(grid_h: int, grid_w: int, factor: int) -> tuple:
    """(merge_index, merge_weight) Tensors of ``merge_tables``, the ``construct`` inputs of a merged evaluation."""
    index, weight = merge_tables(grid_h, grid_w, factor)
    return Tensor(index), Tensor(weight)


def pool_tokens(x, index, weight):
    """Average the tokens of ``x`` (B, L, ...) over the cells of ``merge_tables`` -> (B, S, ...), summed in fp32."""
    b, seq = x.shape[0], x.shape[1]
    rest = x.shape[2:]
    members = ops.gather(x.reshape(b, seq, -1).astype(ms.float32), index, 1)  # (B, S, k, C)
    pooled = mint.sum(members * weight, dim=2)  # (B, S, C)
    return pooled.reshape((b, index.shape[0]) + rest).astype(x.dtype)
