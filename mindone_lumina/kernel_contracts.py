"""NumPy emulators of the documented contracts of the fused Ascend kernels that ``backend.py`` calls, and the check that
the backend's argument preparation, run with an emulator in place of the kernel, equals the portable path.

CI has no Ascend device, so without this the fused paths (flash attention, RMSNorm, rotary embedding) never run: a
wrong layout, mask polarity, scale, head_dim padding or cos/sin layout would first show on a device. Each emulator
takes the MindSpore functional's arguments (Tensors or NumPy arrays), refuses what the documentation refuses or leaves
undefined with a ``ValueError`` naming the argument (the real kernel raises TypeError or RuntimeError, or, where the
documentation says the result is then wrong, returns garbage), computes the documented formula in NumPy and returns
MindSpore Tensors of the dtype the kernel returns, so it drops in for the kernel in PyNative mode (``kernel=`` of
``backend.flash_attention`` / ``fused_rms_norm`` / ``fused_rope``).

Documentation used; each emulator says which parts it follows and what it assumes where they are silent:

* [MS] MindSpore 2.10.0 docstrings, read from the installed wheel (``help(mindspore.ops.flash_attention_score)``,
  ``help(mindspore.ops.rms_norm)``, ``help(mindspore.ops.rotary_position_embedding)``); the stable pages
  https://www.mindspore.cn/docs/en/stable/api_python/ops/mindspore.ops.<name>.html carry the same text.
* [CANN-FA] Ascend CANN ops-transformer (github.com/hicann/ops-transformer):
  ``attention/flash_attention_score/docs/aclnnFlashAttentionScore_en.md`` (commit 827a604),
  ``docs/en/context/sparse_mode_introduction.md`` (commit 2b283fc) and the design notes
  ``attention/flash_attention_score/docs/FA算子设计介绍.md`` (commit 36c13d0).
* [CANN-RoPE] the same repository, ``posembedding/rotary_position_embedding/docs/aclnnRotaryPositionEmbedding_en.md``
  (commit 827a604); older limits in Ascend/MindSpeed-Core-MS ``docs/ops/npu_rotary_position_embedding.md`` (fdbf0d8).
* [CANN-RMS] hicann/ops-nn ``norm/rms_norm/docs/aclnnRmsNorm_en.md`` (commit 8ac78fb).

The CANN pages document the current CANN master, not necessarily the CANN release a MindSpore 2.10 install runs on;
where they differ from [MS], the emulators follow [MS] and say so.
"""

from dataclasses import dataclass

import ml_dtypes
import numpy as np

import mindspore as ms
from mindspore import Tensor, ops

from . import backend, rope

_NUMPY = {ms.float16: np.dtype(np.float16), ms.bfloat16: np.dtype(ml_dtypes.bfloat16), ms.float32: np.dtype(np.float32),
          ms.bool_: np.dtype(np.bool_), ms.uint8: np.dtype(np.uint8)}  # fmt: skip
_HALF = (ms.float16, ms.bfloat16)
_FLOATS = (ms.float16, ms.bfloat16, ms.float32)
_MASKED_SCORE = np.float32(-3.0e38)  # "a very small negative value" ([CANN-FA] design notes); exp(it - max) is 0
_COMPRESSED = 2048  # side of the compressed causal mask of sparse modes 2, 3 and 4


def _array(x, name: str):
    """(NumPy array, MindSpore dtype) of a Tensor (or Parameter) or a NumPy array."""
    if isinstance(x, Tensor):
        return x.asnumpy(), x.dtype
    if isinstance(x, np.ndarray):
        for dtype, np_dtype in _NUMPY.items():
            if x.dtype == np_dtype:
                return x, dtype
        raise ValueError(f"{name} has NumPy dtype {x.dtype}, which none of these kernels takes")
    raise ValueError(f"{name} must be a MindSpore Tensor or a NumPy array, got {type(x).__name__}")


# ------------------------------------------------------------------------------------------------------------------
# FlashAttentionScore
# ------------------------------------------------------------------------------------------------------------------
def flash_attention_score(query, key, value, head_num, real_shift=None, drop_mask=None, padding_mask=None,
                          attn_mask=None, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, keep_prob=1.0,
                          scalar_value=1.0, pre_tokens=2147483647, next_tokens=2147483647, inner_precise=0,
                          input_layout="BSH", sparse_mode=0):  # fmt: skip
    """``mindspore.ops.flash_attention_score`` as documented ([MS] 2.10.0 docstring; [CANN-FA]).

    ``out = softmax(Mask(scalar_value * query key^T, attn_mask)) value`` per query head, returned in the layout and
    dtype of ``query``. Followed: layouts BSH, SBH (H = N * D, N1 = ``head_num``), BNSD, BSND; fp16/bf16 only, q/k/v
    of one dtype; D a multiple of 16 and at most 512, equal for q, k and v; 1 <= N1 <= 256, N1 % N2 == 0, query head
    h reads kv head h // (N1 / N2) (GQA; [CANN-FA] splits N1 as (N2, G)); B <= 2k and S <= 512k ([MS] ranges);
    ``attn_mask`` bool or uint8 with 1/True = discard, shaped (B, N1, S1, S2), (B, 1, S1, S2) or (S1, S2) in sparse
    modes 0 and 1 ([MS]; [CANN-FA] also takes (1, 1, S1, S2), refused here when B > 1) and the compressed causal
    (2048, 2048) ``triu(ones, 1)`` in modes 2-4 ([MS]: required; [CANN-FA]: anything else gives a wrong result, so it
    is refused). Sparse modes ([CANN-FA] sparse_mode_introduction): 0 = the mask, restricted to the band
    ``i - pre_tokens <= j <= i + next_tokens`` (query i, key j; origin top left); 1 = the mask alone; 2 = ``j <= i``;
    3 = ``j <= i + S2 - S1`` (origin bottom right); 4 = the band with origin bottom right, ``i + S2 - S1 - pre_tokens
    <= j <= i + S2 - S1 + next_tokens``. Without ``attn_mask`` no position is masked whatever the mode ([CANN-FA]
    constraints). The (pre_tokens, next_tokens) pairs [MS] forbids are refused. Numerics ([CANN-FA] design notes):
    scores from fp16/bf16 products accumulated in fp32, softmax in fp32, the unnormalised probabilities rounded to
    the input dtype for the second matmul (fp32 accumulation), divided by the fp32 row sum, cast to the input dtype.

    Not emulated, refused: ``real_shift`` (pse), ``drop_mask`` and ``keep_prob`` != 1 (dropout), ``padding_mask``
    (reserved), ``prefix`` and sparse mode 5, modes 6-8 ([MS]: not implemented), layout TND with
    ``actual_seq_qlen``/``actual_seq_kvlen`` (varlen), ``inner_precise`` 2 (invalid-row computation, [CANN-FA]).

    Where the documentation is silent, assumed: a fully masked query row. [CANN-FA] replaces discarded scores by a very
    small negative value, so such a row averages all values uniformly here; the kernel may treat it as an "invalid
    row" (with inner_precise 2, or when it detects one) and return something else, e.g. zeros: callers should not
    rely on either. Where the mask and the band of mode 0 disagree ([CANN-FA]: they must be consistent) the emulator
    keeps what both keep. The online softmax's per-block rescaling (S2 blocks) is not modelled: exact arithmetic gives
    one softmax per row, the rounding differs in the last fp32 bits. [CANN-FA] (current CANN) also accepts fp32 and
    any D <= 768; [MS] 2.10 does not, and neither does this emulator (the backend pads D = 72 to 80).
    """
    unsupported = {"real_shift": real_shift, "drop_mask": drop_mask, "padding_mask": padding_mask, "prefix": prefix,
                   "actual_seq_qlen": actual_seq_qlen, "actual_seq_kvlen": actual_seq_kvlen}  # fmt: skip
    for name, arg in unsupported.items():
        if arg is not None:
            raise ValueError(f"{name} is not emulated; pass None")
    if keep_prob != 1.0:
        raise ValueError(f"keep_prob {keep_prob}: dropout is not emulated; pass 1.0")
    if inner_precise not in (0, 1):
        raise ValueError(f"inner_precise {inner_precise}: only the reserved values 0 and 1 are emulated")
    if input_layout == "TND":
        raise ValueError("input_layout 'TND' (varlen, cumulative actual_seq_qlen/kvlen) is not emulated")
    if input_layout not in ("BSH", "BNSD", "SBH", "BSND"):
        raise ValueError(f"input_layout {input_layout!r} is not one of 'BSH', 'BNSD', 'SBH', 'BSND', 'TND'")
    q, dtype = _array(query, "query")
    k, k_dtype = _array(key, "key")
    v, v_dtype = _array(value, "value")
    if dtype not in _HALF:
        raise ValueError(f"query dtype {dtype}: flash_attention_score takes float16 or bfloat16 only ([MS] 2.10)")
    if k_dtype != dtype or v_dtype != dtype:
        raise ValueError(f"key ({k_dtype}) and value ({v_dtype}) must have the dtype of query ({dtype})")
    if not isinstance(head_num, int) or not 1 <= head_num <= 256:
        raise ValueError(f"head_num must be an int in [1, 256], got {head_num!r}")
    if k.shape != v.shape:
        raise ValueError(f"key {k.shape} and value {v.shape} must have one shape")
    q = _to_bnsd(q, input_layout, head_num, "query")
    b, n1, s1, d = q.shape
    if n1 != head_num:
        raise ValueError(f"head_num {head_num} differs from the {n1} heads of query")
    kv_heads = None  # read from the shape in BNSD and BSND
    if input_layout in ("BSH", "SBH"):
        if k.ndim != 3 or k.shape[-1] < d or k.shape[-1] % d:
            raise ValueError(f"key shape {k.shape}: layout {input_layout} needs H2 a multiple of the head size {d}")
        kv_heads = k.shape[-1] // d
    k, v = _to_bnsd(k, input_layout, kv_heads, "key"), _to_bnsd(v, input_layout, kv_heads, "value")
    n2, s2 = k.shape[1], k.shape[2]
    if k.shape[-1] != d:
        raise ValueError(f"head size of key/value {k.shape[-1]} differs from that of query {d}")
    if d % 16 or d > 512:
        raise ValueError(f"head size D={d}: the kernel takes a multiple of 16, at most 512 ([MS] 2.10)")
    if k.shape[0] != b:
        raise ValueError(f"batch of key/value {k.shape[0]} differs from that of query {b}")
    if n1 % n2:
        raise ValueError(f"query heads {n1} must be a multiple of key/value heads {n2}")
    if b > 2048 or max(s1, s2) > 512 * 1024:
        raise ValueError(f"B={b}, S1={s1}, S2={s2} exceed the documented ranges (B <= 2k, S <= 512k)")
    keep = _kept(attn_mask, sparse_mode, pre_tokens, next_tokens, (b, n1, s1, s2))
    group = n1 // n2
    k32 = np.repeat(k.astype(np.float32), group, axis=1)  # (B, N1, S2, D): query head h reads kv head h // group
    v32 = np.repeat(v.astype(np.float32), group, axis=1)
    scores = np.float32(scalar_value) * np.matmul(q.astype(np.float32), k32.transpose(0, 1, 3, 2))  # (B, N1, S1, S2)
    if keep is not None:
        scores = np.where(keep, scores, _MASKED_SCORE)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))  # fp32, unnormalised, in (0, 1]
    out = np.matmul(p.astype(q.dtype).astype(np.float32), v32) / p.sum(axis=-1, keepdims=True)  # (B, N1, S1, D)
    return Tensor(_from_bnsd(out.astype(q.dtype), input_layout))


def _to_bnsd(x, layout: str, heads, name: str):
    """(B, N, S, D) of a q/k/v in ``layout``; ``heads`` splits H = N * D of BSH and SBH."""
    if x.ndim != len(layout):
        raise ValueError(f"{name} has shape {x.shape}, not the {len(layout)} axes of layout {layout}")
    if layout in ("BSH", "SBH"):
        if x.shape[-1] % heads:
            raise ValueError(f"{name} hidden size {x.shape[-1]} is not divisible by {heads} heads")
        x = x if layout == "BSH" else x.transpose(1, 0, 2)  # (B, S, H)
        return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3)
    return x if layout == "BNSD" else x.transpose(0, 2, 1, 3)


def _from_bnsd(x, layout: str):
    """(B, N, S, D) back to ``layout``."""
    if layout == "BNSD":
        return x
    bsnd = x.transpose(0, 2, 1, 3)  # (B, S, N, D)
    if layout == "BSND":
        return bsnd
    bsh = bsnd.reshape(bsnd.shape[0], bsnd.shape[1], -1)
    return bsh if layout == "BSH" else bsh.transpose(1, 0, 2)


def _kept(attn_mask, sparse_mode, pre_tokens: int, next_tokens: int, shape):
    """Which scores enter the softmax, broadcastable to (B, N1, S1, S2) bool, or None for all of them."""
    b, n1, s1, s2 = shape
    if sparse_mode == 5:
        raise ValueError("sparse_mode 5 (prefix) is not emulated")
    if sparse_mode not in range(5):
        raise ValueError(f"sparse_mode {sparse_mode}: [MS] 2.10 implements 0-5 (6-8 are 'not implemented yet')")
    if attn_mask is None:
        return None
    mask, mask_dtype = _array(attn_mask, "attn_mask")
    if mask_dtype not in (ms.bool_, ms.uint8):
        raise ValueError(f"attn_mask dtype {mask_dtype}: bool or uint8 only (1/True = discard)")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attn_mask holds values other than 0 and 1")
    mask = mask.astype(bool)
    i, j = np.arange(s1)[:, None], np.arange(s2)[None, :]
    if sparse_mode in (0, 1):
        if mask.shape not in ((b, n1, s1, s2), (b, 1, s1, s2), (s1, s2)):
            raise ValueError(f"attn_mask shape {mask.shape} is not (B, N1, S1, S2), (B, 1, S1, S2) or (S1, S2) of "
                             f"{(b, n1, s1, s2)} (sparse_mode {sparse_mode})")  # fmt: skip
        keep = ~mask
        if sparse_mode == 0:
            _check_band(pre_tokens, next_tokens, s1, s2)
            keep = keep & (j >= i - pre_tokens) & (j <= i + next_tokens)  # band with origin top left
        return keep
    causal = np.triu(np.ones((_COMPRESSED, _COMPRESSED), bool), 1)  # True above the diagonal: discard
    if mask.shape != causal.shape or not np.array_equal(mask, causal):
        raise ValueError(f"sparse_mode {sparse_mode} needs the compressed causal attn_mask, triu(ones(2048, 2048), 1)")
    shift = s2 - s1  # modes 3 and 4 count from the bottom-right corner
    if sparse_mode == 2:
        return j <= i
    if sparse_mode == 3:
        return j <= i + shift
    _check_band(pre_tokens, next_tokens, s1, s2)
    return (j >= i + shift - pre_tokens) & (j <= i + shift + next_tokens)


def _check_band(pre: int, nxt: int, s1: int, s2: int) -> None:
    """The (pre_tokens, next_tokens) pairs [MS] 2.10 forbids (the band must not be empty). [CANN-FA] states the last
    two with S1 and S2 exchanged; the emulator follows [MS]."""
    if pre < 0 and nxt < 0:
        raise ValueError(f"pre_tokens {pre} and next_tokens {nxt} are both negative")
    if pre < 0 <= nxt and (nxt < -pre or -pre >= s2):
        raise ValueError(f"pre_tokens {pre} < 0 needs next_tokens ({nxt}) >= |pre_tokens| and |pre_tokens| < S2 {s2}")
    if nxt < 0 <= pre and (-nxt > pre or -nxt >= s1):
        raise ValueError(f"next_tokens {nxt} < 0 needs pre_tokens ({pre}) >= |next_tokens| and |next_tokens| < S1 {s1}")


# ------------------------------------------------------------------------------------------------------------------
# RmsNorm
# ------------------------------------------------------------------------------------------------------------------
def rms_norm(x, gamma, epsilon=1e-6):
    """``mindspore.ops.rms_norm`` as documented ([MS] 2.10.0 docstring; [CANN-RMS]): ``(y, rstd)``.

    ``rstd = 1 / sqrt(mean(x^2) + epsilon)`` over the trailing axes ``gamma`` spans, float32, shaped as ``x`` with
    those axes 1 ([MS] example: x (2, 3), gamma (3,) -> rstd (2, 1); [CANN-RMS]); ``y = rstd * x * gamma`` in the
    dtype of ``x``. Followed: fp16, bf16, fp32; ``gamma`` of the dtype of ``x`` ([MS]; [CANN-RMS] also takes fp32
    gamma with a half-precision x); ``gamma.shape == x.shape[n:]`` for some 0 <= n < x.ndim ([CANN-RMS]; [MS] only
    bounds the rank); 0 < epsilon <= 1.

    Assumed (both documents are silent on the internal precision): x and gamma upcast to fp32, the whole formula in
    fp32, rounded once to the dtype of x. The portable LLaMA form rounds the normalised x to that dtype before it
    multiplies by the weight, so half-precision results may differ from this by an ulp.
    """
    xa, dtype = _array(x, "x")
    ga, g_dtype = _array(gamma, "gamma")
    if dtype not in _FLOATS:
        raise ValueError(f"x dtype {dtype}: rms_norm takes float16, bfloat16 or float32")
    if g_dtype != dtype:
        raise ValueError(f"gamma dtype {g_dtype} differs from the dtype of x {dtype} ([MS] 2.10)")
    if not 0 < epsilon <= 1:
        raise ValueError(f"epsilon {epsilon} is not in (0, 1]")
    if not 1 <= ga.ndim <= xa.ndim or xa.shape[xa.ndim - ga.ndim :] != ga.shape:
        raise ValueError(f"gamma shape {ga.shape} is not a trailing part of the shape of x {xa.shape}")
    axes = tuple(range(xa.ndim - ga.ndim, xa.ndim))
    x32 = xa.astype(np.float32)
    rstd = np.float32(1) / np.sqrt(np.mean(x32 * x32, axis=axes, keepdims=True) + np.float32(epsilon))
    y = rstd * x32 * ga.astype(np.float32)
    return Tensor(y.astype(xa.dtype)), Tensor(rstd.astype(np.float32))


# ------------------------------------------------------------------------------------------------------------------
# RotaryPositionEmbedding
# ------------------------------------------------------------------------------------------------------------------
_ROPE_AXES = {"BNSD": (0, 1, 2), "BSND": (0, 2, 1), "SBND": (1, 2, 0)}  # axes of B, N, S in x


def rotary_position_embedding(x, cos, sin, mode=0):
    """``mindspore.ops.rotary_position_embedding`` as documented ([MS] 2.10.0 docstring; [CANN-RoPE]).

    ``y = x * cos + rotate(x) * sin`` with full-width (D) tables ([CANN-RoPE] formulas): mode 0 (rotate_half,
    GPT-NeoX) ``rotate(x) = cat(-x[..., D/2:], x[..., :D/2])``; mode 1 (interleaved, GPT-J) ``rotate(x)[2k] =
    -x[2k+1]``, ``rotate(x)[2k+1] = x[2k]``. Followed: x, cos and sin 4-D of one dtype (fp16, bf16, fp32), cos and
    sin of one shape; D even and < 896; the layout of x read from the shape of cos ([MS] table): a BNSD x takes cos
    11SD (mode 0 also B1SD, BNSD), BSND takes 1S1D (also BS1D, BSND), SBND takes S11D (also SB1D, SBND); mode 0:
    B, N < 1000; mode 1: B * N < 1000 (the Chinese [MS] page and [CANN-RoPE]; the English 2.10 docstring says B,
    N < 1000: the stricter reading is enforced); a BNSD x with B * N > 8 S and 32-byte-aligned rows is refused ([MS]
    note: "this interface cannot be called").

    Assumed (the documents are silent on the internal precision): products and sum in fp32, rounded once to the dtype
    of x. Risk: the older MindSpeed page limits mode 1 to D a multiple of 32, D <= 256 and B * N <= 20; a CANN release
    with those limits would refuse Next-DiT's D = 72, which [MS] 2.10 allows.
    """
    xa, dtype = _array(x, "x")
    ca, c_dtype = _array(cos, "cos")
    sa, s_dtype = _array(sin, "sin")
    if dtype not in _FLOATS:
        raise ValueError(f"x dtype {dtype}: rotary_position_embedding takes float16, bfloat16 or float32")
    if c_dtype != dtype or s_dtype != dtype:
        raise ValueError(f"cos ({c_dtype}) and sin ({s_dtype}) must have the dtype of x ({dtype})")
    if mode not in (0, 1):
        raise ValueError(f"mode {mode!r}: 0 (rotate_half) or 1 (interleaved)")
    if xa.ndim != 4 or ca.ndim != 4 or ca.shape != sa.shape:
        raise ValueError(f"x {xa.shape} must be 4-D, and cos {ca.shape} and sin {sa.shape} of one shape")
    d = xa.shape[3]
    if d % 2 or d >= 896:
        raise ValueError(f"head size D={d}: the kernel takes an even D < 896")
    layout, (b, n, s) = _rope_layout(xa.shape, ca.shape, mode)
    if (mode == 0 and max(b, n) >= 1000) or (mode == 1 and b * n >= 1000):
        raise ValueError(f"B={b}, N={n} exceed the documented range ({'B, N' if mode == 0 else 'B * N'} < 1000)")
    if layout == "BNSD" and b * n > 8 * s and d * xa.dtype.itemsize % 32 == 0:
        raise ValueError(f"BNSD x with B * N = {b * n} > 8 S = {8 * s} and 32-byte rows: not callable ([MS] note)")
    x32, c32, s32 = xa.astype(np.float32), ca.astype(np.float32), sa.astype(np.float32)
    if mode == 0:
        rotated = np.concatenate([-x32[..., d // 2 :], x32[..., : d // 2]], axis=-1)
    else:
        rotated = np.stack([-x32[..., 1::2], x32[..., 0::2]], axis=-1).reshape(x32.shape)
    return Tensor((x32 * c32 + rotated * s32).astype(xa.dtype))


def _rope_layout(x_shape, cos_shape, mode: int):
    """(layout of x, (B, N, S)) that the shape of cos documents ([MS] table), or ValueError."""
    allowed = []
    for layout, axes in _ROPE_AXES.items():
        kept = [(axes[2],)] + ([(axes[0], axes[2]), axes] if mode == 0 else [])  # S; B and S; B, N and S
        for keep in kept:
            shape = tuple(x_shape[a] if a in keep else 1 for a in range(3)) + (x_shape[3],)
            if tuple(cos_shape) == shape:
                return layout, tuple(x_shape[a] for a in axes)
            allowed.append(shape)
    raise ValueError(f"cos shape {tuple(cos_shape)} fits no documented layout for x {tuple(x_shape)} in mode {mode}: "
                     f"expected one of {allowed}")  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# The contract check: the backend's fused preparation with the emulators against the portable path
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContractRow:
    """One comparison; ``error`` is the relative Frobenius error ``||fused - reference|| / ||reference||``."""

    kernel: str
    case: str
    error: float
    budget: float

    @property
    def passed(self) -> bool:
        return bool(self.error <= self.budget)  # NaN fails


# Budgets, in units u (unit roundoff: fp16 2^-11, bf16 2^-8, fp32 2^-24) of the dtype the fused kernel computes in
# (fp32 attention inputs go through fp16). Attention, 4 u: each side rounds intermediates to the half dtype (portable
# fp16: the scaled queries, the scores, the probabilities and the output; fused: the probabilities and the output;
# the bf16 reference runs in fp32, as CPU has no bf16 matmul), each moving the output by at most u of its size, in
# directions that mostly cancel (measured here: 0.7-0.95 u in fp16, 0.5 u in bf16). RMSNorm, 2 u: the portable LLaMA
# form rounds twice (the normalised x, then its product with the weight), the emulated kernel once (measured 0.6-0.8
# u). RoPE, 1 u of the output dtype: both sides form the same two fp32 products and their sum (measured: bitwise
# equal); a kernel with fused multiply-add differs by an fp32 rounding, which now and then flips a half rounding.
_U = {ms.float16: 2.0**-11, ms.bfloat16: 2.0**-8, ms.float32: 2.0**-24}
_ATTENTION = (  # case, input dtype, (B, L, S, N, Nkv, D), padded keys, causal mask
    ("self-attention fp16, D=72, GQA 2:1, L=S=13", ms.float16, (2, 13, 13, 4, 2, 72), False, False),
    ("cross-attention fp16, L=9 S=6, padded keys, D=72, GQA 2:1", ms.float16, (2, 9, 6, 4, 2, 72), True, False),
    ("causal + padded keys fp16, MQA, D=64, L=S=11", ms.float16, (2, 11, 11, 2, 1, 64), True, True),
    ("self-attention bf16, D=72, GQA 2:1, padded keys, L=S=13", ms.bfloat16, (2, 13, 13, 4, 2, 72), True, False),
    ("cross-attention fp32 inputs (run in fp16), L=7 S=5, D=72", ms.float32, (1, 7, 5, 2, 2, 72), True, False),
)
_NORM_SHAPE, _ROPE_SHAPE = (2, 7, 72), (2, 12, 3, 72)  # (B, L, dim); (B, L, N, D) with L a 3 x 4 patch grid


def check(real_kernels: bool = False) -> list[ContractRow]:
    """The backend's fused preparation (``backend.flash_attention``, ``fused_rms_norm``, ``fused_rope``) with the
    emulators as kernels, against the portable path on the same inputs: one ``ContractRow`` per kernel and case.
    With ``real_kernels`` (Ascend only) also the real kernel against the emulator on the recorded arguments.

    Runs in PyNative mode (the emulators are NumPy) and restores the caller's execution mode; draws its inputs from
    its own seeded generator.
    """
    if real_kernels and ms.get_context("device_target") != "Ascend":
        raise ValueError(f"real_kernels needs an Ascend device; this one is {ms.get_context('device_target')}")
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        rng = np.random.default_rng(0)
        return _attention_rows(rng, real_kernels) + _rms_norm_rows(rng, real_kernels) + _rope_rows(rng, real_kernels)
    finally:
        ms.set_context(mode=previous)


def _attention_rows(rng, real: bool) -> list:
    rows = []
    for case, dtype, (b, seq_q, seq_k, n, n_kv, d), padded, causal in _ATTENTION:
        q = rng.standard_normal((b, seq_q, n, d)).astype(np.float32)
        k, v = (rng.standard_normal((b, seq_k, n_kv, d)).astype(np.float32) for _ in range(2))
        keys = np.ones((b, seq_k), bool)
        keys[-1, seq_k - seq_k // 3 :] = False  # the last sample's keys end in padding
        key_mask = Tensor(keys) if padded else None
        attn_mask = Tensor(np.tril(np.ones((seq_q, seq_k), bool))[None, None]) if causal else None
        inputs = [Tensor(a).astype(dtype) for a in (q, k, v)]
        scale = float(d) ** -0.5
        kernel = _Recorder(flash_attention_score)
        fused = backend.flash_attention(*inputs, key_mask, scale, attn_mask, kernel=kernel)
        if dtype == ms.bfloat16:  # no bf16 matmul on CPU: the reference is fp32 on the same (bf16) values
            inputs = [t.astype(ms.float32) for t in inputs]
        reference = backend.attention(*inputs, key_mask, scale, False, attn_mask=attn_mask)
        budget = 4 * _U[ms.float16 if dtype == ms.float32 else dtype]
        rows.append(ContractRow("flash_attention_score", case, _rel_error(fused, reference), budget))
        if real:
            rows.append(kernel.replay(ops.flash_attention_score, "flash_attention_score", case, budget))
    return rows


def _rms_norm_rows(rng, real: bool) -> list:
    rows = []
    for dtype in (ms.float16, ms.bfloat16, ms.float32):
        x = Tensor(rng.standard_normal(_NORM_SHAPE).astype(np.float32)).astype(dtype)
        weight = Tensor((1 + 0.1 * rng.standard_normal(_NORM_SHAPE[-1])).astype(np.float32)).astype(dtype)
        kernel = _Recorder(rms_norm)
        fused = backend.fused_rms_norm(x, weight, 1e-5, kernel=kernel)
        reference = backend.rms_norm(x, weight, 1e-5, fused=False)
        case, budget = f"{_name(dtype)} x (B, L, dim) = {_NORM_SHAPE}", 2 * _U[dtype]
        rows.append(ContractRow("rms_norm", case, _rel_error(fused, reference), budget))
        if real:
            rows.append(kernel.replay(ops.rms_norm, "rms_norm", case, budget))
    return rows


def _rope_rows(rng, real: bool) -> list:
    rows = []
    cos, sin = (Tensor(t) for t in rope.nextdit_rope(_ROPE_SHAPE[3], 3, 4, 1.5, 0.5, 0.2))  # (L, D/2) each
    for dtype in (ms.float32, ms.float16, ms.bfloat16):
        x = Tensor(rng.standard_normal(_ROPE_SHAPE).astype(np.float32)).astype(dtype)
        kernel = _Recorder(rotary_position_embedding)
        fused = backend.fused_rope(x, cos, sin, kernel=kernel)
        case, budget = f"{_name(dtype)} x (B, L, N, D) = {_ROPE_SHAPE}, Next-DiT tables", _U[dtype]
        rows.append(
            ContractRow("rotary_position_embedding", case, _rel_error(fused, rope.apply_rope(x, cos, sin)), budget)
        )
        if real:
            rows.append(kernel.replay(ops.rotary_position_embedding, "rotary_position_embedding", case, budget))
    return rows


class _Recorder:
    """A kernel that keeps the arguments and the output of its call, to replay the call on the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __call__(self, *args, **kwargs):
        out = self.kernel(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out

    def replay(self, real, name: str, case: str, budget: float) -> ContractRow:
        assert len(self.calls) == 1, f"the backend called {name} {len(self.calls)} times"
        args, kwargs, emulated = self.calls[0]
        got = real(*args, **kwargs)
        first = (lambda out: out[0]) if isinstance(emulated, tuple) else (lambda out: out)  # rms_norm: (y, rstd)
        return ContractRow(name, f"{case}: Ascend kernel vs emulator", _rel_error(first(got), first(emulated)), budget)


def _rel_error(actual, reference) -> float:
    a, r = (t.astype(ms.float32).asnumpy().astype(np.float64) for t in (actual, reference))
    assert a.shape == r.shape, (a.shape, r.shape)
    return float(np.linalg.norm(a - r) / np.linalg.norm(r))


def _name(dtype) -> str:
    return {ms.float16: "fp16", ms.bfloat16: "bf16", ms.float32: "fp32"}[dtype]
