"""Kernels that differ between Ascend and the portable (CPU) path, behind one capability check.

Every model file calls these functions and nothing else backend-specific. A Cell decides once, at construction, whether
it uses fused kernels (``use_fused_kernels()``; on CPU the project's compiled kernels, ``compiled_kernels()``; for
convolutions ``convolution.conv_kernel()``) and stores the answer as a Python constant, so graph mode folds the branch
away. The portable path is what CI tests; the fused path runs only on Ascend (see README, "Ascend vs CPU").

Each fused path is argument preparation plus one kernel call, with the kernel a parameter (``kernel=None``: the real
one), so that ``kernel_contracts.check`` runs the exact preparation on CPU with a NumPy emulator of the kernel's
documented contract in its place.

Set ``MINDONE_LUMINA_PORTABLE=1`` to force the portable ops on Ascend (useful to bisect a numeric difference).
"""

import os

import mindspore as ms
from mindspore import mint, ops

from . import cpu_kernels, rope

_FA_DTYPES = (ms.float16, ms.bfloat16)
_MASKED = -1e30  # exp underflows to exactly 0, like torch's -inf, without inf - inf = nan on fully masked rows


def is_cpu() -> bool:
    """The platform question (memory policy, which framework functions can run), apart from the kernel choice."""
    return ms.get_context("device_target") == "CPU"


def use_fused_kernels() -> bool:
    """The one capability check: fused Ascend kernels (flash attention, RMSNorm, RoPE) are used only on Ascend."""
    return ms.get_context("device_target") == "Ascend" and os.environ.get("MINDONE_LUMINA_PORTABLE", "0") != "1"


def compiled_kernels() -> bool:
    """Whether this process runs the project's compiled CPU kernels (``cpu_kernels.py``): on CPU, unless
    ``MINDONE_LUMINA_CPU_KERNELS=0``, where they build (a C++ compiler and MindSpore's ``libdnnl.so.3``)."""
    if not is_cpu() or os.environ.get("MINDONE_LUMINA_CPU_KERNELS", "1") == "0":
        return False
    return cpu_kernels.available()


def release_compiled(cell=None) -> None:
    """Return the memory MindSpore 2.10 keeps for compiled graphs: the workspace of ``cell``'s graphs (kept while
    the Cell lives; the next call compiles again), and the reference the graph executor holds to the parameters of
    the Cell compiled last (``set_weights_values``, kept until the next compilation). Measured on CPU: a released
    Gemma-2B (10 GB) stayed resident until the next model compiled; one Next-DiT-2B block graph at 4096 tokens keeps
    9.1 GB, 3.2 GB after its release."""
    try:
        from mindspore.graph.api import _cell_graph_executor
    except ImportError:  # another MindSpore version: nothing this module knows to release
        return
    if cell is not None and getattr(cell, "compile_cache", None):
        _cell_graph_executor.del_net_res(cell, set(cell.compile_cache))
        cell.compile_cache.clear()
    _cell_graph_executor._graph_executor.set_weights_values({})


def set_device(name: str, convolutions: bool = False) -> None:
    """``ms.set_device`` with the runtime settings measured best for the project on that device; call it first.

    On CPU: ``MS_DEV_HOST_BLOCKING_RUN=1``. MindSpore 2.10 otherwise runs each graph on a worker thread while the
    calling thread waits for it in a busy loop (``AsyncRQueue::Wait``), which holds one of the cores the kernels need
    (80% of a core measured on 2 cores); host-blocking runs the graph on the calling thread instead. The training
    step ran 2x faster (benchmarks README, "Host-blocking run"). A value the user has set is kept. ``convolutions``:
    the process is mostly convolutions (``convolution.favour_convolutions``).
    """
    ms.set_device(name)
    if is_cpu():
        os.environ.setdefault("MS_DEV_HOST_BLOCKING_RUN", "1")  # MindSpore reads it at its first op
        if convolutions:
            from . import convolution  # it imports this module's capability checks

            convolution.favour_convolutions()


def check_dtype_supported(dtype) -> None:
    """bf16 matmul has no CPU kernel in MindSpore 2.10; fail early with a message instead of deep inside a graph."""
    if dtype == ms.bfloat16 and is_cpu():
        raise ValueError("bfloat16 compute is Ascend-only (MindSpore has no bf16 MatMul on CPU); use fp32 or fp16")


# ------------------------------------------------------------------------------------------------------------------
# Broadcasts and reductions
# ------------------------------------------------------------------------------------------------------------------
# MindSpore's CPU ReduceSum/ReduceMean cost about 1.2 ms on 393K floats, almost whatever the axes, where a matmul with
# a vector of ones takes 0.05 ms (measured: benchmarks/README, "Broadcasts and reductions as matmuls"). Autodiff turns
# every broadcast of the forward pass into a ReduceSum of the backward one (a (B, 1, D) adaLN scale times (B, L, D)
# tokens: a sum over L), so the portable path spreads such vectors with a matmul by ones, which is exact (one product
# per element, nothing summed), and whose gradient is again a matmul. On the fused path the consumer broadcasts.


def spread_tokens(v, length: int, fused: bool = False):
    """``v`` (B, D) for every one of ``length`` tokens: (B, L, D), or (B, 1, D) to broadcast on the fused path."""
    if fused:
        return v.unsqueeze(1)
    return _times_ones(v.unsqueeze(1), (v.shape[0], length, 1), ops.bmm)  # (B, L, 1) @ (B, 1, D)


def spread_features(w, like, fused: bool = False):
    """A (D,) vector at every position of ``like`` (..., D), or ``w`` itself to broadcast on the fused path."""
    if fused:
        return w
    rows = 1
    for n in like.shape[:-1]:
        rows *= n
    return _times_ones(w.reshape(1, -1), (rows, 1), ops.matmul).reshape(like.shape)  # (N, 1) @ (1, D)


def _times_ones(v, ones_shape: tuple, product):
    """``product(ones, v)``, in fp32 for bf16 (no bf16 matmul on CPU; exact either way: nothing is summed)."""
    if v.dtype == ms.bfloat16:
        return product(ops.ones(ones_shape, ms.float32), v.astype(ms.float32)).astype(v.dtype)
    return product(ops.ones(ones_shape, v.dtype), v)


def _mean_last(x):
    """(..., D) -> (..., D), each row's mean at every position of the row, as two matmuls (see above)."""
    d = x.shape[-1]
    # 2-D products: PyNative ran a 3-D ``ops.matmul`` as another kernel than graph mode, which summed in another order
    mean = ops.matmul(x.reshape(-1, d), ops.ones((d, 1), x.dtype) * (1.0 / d))  # (N, 1)
    return ops.matmul(mean, ops.ones((1, d), x.dtype)).reshape(x.shape)


# ------------------------------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------------------------------


def rms_norm(x, weight, eps: float, fused: bool = False, compiled: bool = False, scale=None, shift=None):
    """LLaMA RMSNorm as the Lumina reference: normalise in fp32, cast back, then multiply by the weight; with an adaLN
    ``scale`` / ``shift`` (B, D) for a (B, L, D) ``x``, then ``* scale + shift`` on each sample's tokens. ``compiled``:
    on the project's CPU kernel (``compiled_kernels()``) for fp32, normalisation, weight and modulation in one pass each
    way with the same roundings; other dtypes normalise on it and keep the rest portable."""
    if compiled and x.dtype == ms.float32:
        return cpu_kernels.row_norm(x, eps, False, weight, scale, shift)
    if fused:
        y = fused_rms_norm(x, weight, eps)
    else:
        y = _rms_normalise(x, eps, compiled).astype(x.dtype) * spread_features(weight, x)
    return _modulate(y, scale, shift, fused)


def fused_rms_norm(x, weight, eps: float, kernel=None):
    """Ascend RmsNorm; ``kernel`` replaces ``ops.rms_norm`` (the contract check passes its NumPy emulator,
    ``kernel_contracts.py``), as in every fused path here: argument preparation, then one kernel call."""
    kernel = ops.rms_norm if kernel is None else kernel
    return kernel(x, weight, eps)[0]


def rms_norm_offset(x, weight, eps: float, compiled: bool = False):
    """Gemma's RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)``, all in fp32, cast to the input dtype at the end."""
    gain = 1.0 + weight.astype(ms.float32)
    if compiled:
        return cpu_kernels.row_norm(x.astype(ms.float32), eps, False, gain).astype(x.dtype)
    return (_rms_normalise(x, eps, compiled) * gain).astype(x.dtype)


def _rms_normalise(x, eps: float, compiled: bool):
    x32 = x.astype(ms.float32)
    if compiled:
        return cpu_kernels.row_norm(x32, eps, centred=False)
    return x32 * ops.rsqrt(_mean_last(x32 * x32) + eps)


def layer_norm(x, weight, bias, eps: float, fused: bool = False, compiled: bool = False, scale=None, shift=None):
    """LayerNorm over the last axis, statistics in fp32 (``weight``/``bias`` may be None), then an adaLN ``scale`` /
    ``shift`` as ``rms_norm``. ``compiled``: as ``rms_norm`` (a bias and a modulation together stay portable)."""
    if compiled and x.dtype == ms.float32 and (bias is None or (scale is None and shift is None)):
        return cpu_kernels.row_norm(x, eps, True, weight, scale, shift if bias is None else bias.reshape(1, -1))
    if fused:
        y = mint.nn.functional.layer_norm(x.astype(ms.float32), (x.shape[-1],), None, None, eps)
    elif compiled:
        y = cpu_kernels.row_norm(x.astype(ms.float32), eps, centred=True)
    else:
        x32 = x.astype(ms.float32)
        centred = x32 - _mean_last(x32)
        y = centred * ops.rsqrt(_mean_last(mint.square(centred)) + eps)
    y = y.astype(x.dtype)
    if weight is not None:
        y = y * spread_features(weight, y, fused)
    if bias is not None:
        y = y + spread_features(bias, y, fused)
    return _modulate(y, scale, shift, fused)


def _modulate(y, scale, shift, fused: bool):
    """``y * scale + shift`` of (B, L, D) tokens and (B, D) adaLN vectors (either may be None)."""
    if scale is not None:
        y = y * spread_tokens(scale, y.shape[1], fused)
    if shift is not None:
        y = y + spread_tokens(shift, y.shape[1], fused)
    return y


def group_norm(x, groups: int, weight, bias, eps: float, compiled: bool = False, silu: bool = False):
    """torch ``group_norm`` of (B, C, *spatial) with statistics and affine in fp32, returned in x's dtype (torch also
    computes half-precision GroupNorm in fp32), then SiLU if ``silu``. ``compiled``: the project's CPU kernel
    (``compiled_kernels()``; MindSpore's CPU GroupNorm with its gradient took 18x torch's time on a VAE training shape),
    with the SiLU in the same pass for fp32."""
    x32, w, b = x.astype(ms.float32), weight.astype(ms.float32), bias.astype(ms.float32)
    fuse = compiled and silu and x.dtype == ms.float32
    if compiled:
        y = cpu_kernels.group_norm(x32, groups, w, b, eps, fuse).astype(x.dtype)
    else:
        y = mint.nn.functional.group_norm(x32, groups, w, b, eps).astype(x.dtype)
    return mint.nn.functional.silu(y) if silu and not fuse else y


def gelu_tanh(x, fused: bool = False):
    """GELU with the tanh approximation.

    GeluExt (mint) has no CPU kernel; the legacy GeLU primitive does and matches torch bit for bit in fp32. Spelling
    the formula out with ``mint.tanh`` is not an option on CPU: that kernel is off by up to 1e-4 (abs).
    """
    if fused:
        return mint.nn.functional.gelu(x, approximate="tanh")
    return ops.gelu(x, approximate="tanh")


# ------------------------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------------------------
_CHUNK_BYTES = 1 << 30  # bound on one fp32 score matrix of the portable attention (see ``attention``)
_MASKED_FP16 = -3e4  # the key-mask feature in fp16 (``_MASKED`` is -inf there); exp(-3e4 - max) is still 0


def attention(q, k, v, key_mask, scale: float, fused: bool = False, attn_mask=None, compiled: bool = False):
    """Scaled dot-product attention with grouped kv heads.

    The portable path computes the scores in query chunks of at most ``_CHUNK_BYTES``: the self-attention of a 1024²
    image (2 x 32 heads x 4096² fp32 scores, 4 GiB) peaked at 8.6 GB in CPU graph mode, which keeps several such
    intermediates alive at once; in four chunks it peaked at 2.5 GB, no slower (measured). Each query row's softmax
    is its own, so chunking changes nothing but the order of work. Graph mode does not hand all of a chunk's memory on
    to the next: 2 x 12 heads x 16,512² scores (24 GiB, 26 chunks) peaked at 14.4 GiB, 8,256² (7 chunks) at 4.3 GiB,
    and smaller chunks peak higher (measured on CPU, no mask), which bounds the image size one process can sample.

    The scale and the key mask go into the matmul, not onto the (B, N, L, S) scores: the queries are scaled, and with
    a key mask the queries gain a feature of 1 and the keys one of 0 (attend) or ``_MASKED`` (discard), so the
    product adds the mask. Every elementwise pass over the scores is as large as the matmul's output, and MindSpore
    2.10's CPU broadcast add of a (B, 1, 1, S) mask costs far more (measured, 2 x 12 heads x 4224² scores: the first
    run of a graph 67 s and 10.5 GB for scale and mask added to the scores, 4.9 s and 3.9 GB folded; later runs 1.27
    and 0.76 s). A query's scale changes its scores by at most a rounding (exact for a power-of-two scale).

    Args:
        q: (B, L, N, D) queries.
        k, v: (B, S, Nkv, D) keys and values; N must be a multiple of Nkv (query head h uses kv head h // (N // Nkv)).
        key_mask: (B, S) bool, True = attend, or None for no mask.
        scale: softmax scale (a Python float, a graph constant).
        fused: use Ascend ``flash_attention_score`` for fp16 and bf16 inputs (it takes no fp32: fp32 inputs keep the
            portable path, so an fp32 run computes in fp32 on every device).
        attn_mask: optional (B or 1, 1, L, S) bool, True = attend (e.g. a causal mask), combined with ``key_mask``.
        compiled: the softmax on the project's CPU kernel (``compiled_kernels()``): one pass forward and one backward,
            where MindSpore's gradient is four kernels and its last-axis ReduceSum ran at about 2 GB/s on scores.

    Returns:
        (B, L, N, D) in the dtype of ``q``.
    """
    if fused and q.dtype in _FA_DTYPES:  # fp32 stays fp32 on Ascend too: the kernel would compute in fp16
        return flash_attention(q, k, v, key_mask, scale, attn_mask)
    b, seq_q, n, _ = q.shape
    seq_k, n_kv = k.shape[1], k.shape[2]
    q = q * scale
    if key_mask is not None:
        masked = _MASKED_FP16 if q.dtype == ms.float16 else _MASKED
        bias = ((1.0 - key_mask.astype(ms.float32)) * masked).astype(k.dtype).reshape(b, seq_k, 1, 1)
        q = mint.cat([q, mint.ones((b, seq_q, n, 1), dtype=q.dtype)], dim=3)  # (B, L, N, D + 1)
        k = mint.cat([k, mint.broadcast_to(bias, (b, seq_k, n_kv, 1))], dim=3)  # (B, S, Nkv, D + 1)
    # grouped-query layout: the ``rep`` query heads that share a kv head are stacked along the query axis, so each kv
    # head is read in place. Repeating the kv heads instead (a broadcast view, then a copy) cost a strided copy of
    # every key and value tensor and a ReduceSum over the copies in the backward (measured: 2.8 ms per layer of the
    # default model's training step, of 0.15 s)
    rep = n // n_kv
    # ops.transpose, not mint.permute: the view op's strided output made the elementwise kernels after it, and those
    # of the backward, 3-5x slower on CPU (measured: a training step at the default model's size 1.5 s -> 0.87 s)
    q = ops.transpose(q.reshape(b, seq_q, n_kv, rep, -1), (0, 2, 3, 1, 4))  # (B, Nkv, rep, L, D')
    k = ops.transpose(k, (0, 2, 3, 1))  # (B, Nkv, D', S)
    v = ops.transpose(v, (0, 2, 1, 3))  # (B, Nkv, S, D)
    chunks = -(-b * n * seq_q * seq_k * 4 // _CHUNK_BYTES)  # shapes are graph constants: so is this
    size = -(-seq_q // chunks)
    parts = []
    for i in range(0, seq_q, size):
        chunk_mask = None if attn_mask is None else attn_mask[:, :, i : i + size]
        parts.append(_attend(q[:, :, :, i : i + size] if chunks > 1 else q, k, v, chunk_mask, compiled))
    out = parts[0] if chunks == 1 else mint.cat(parts, dim=3)  # (B, Nkv, rep, L, D)
    return ops.transpose(out, (0, 3, 1, 2, 4)).reshape(b, seq_q, n, -1)  # (B, L, N, D); head h = (h // rep, h % rep)


# the BatchMatMul primitive, not mint.matmul: its gradients are BatchMatMuls with transposed operands, where
# mint.matmul's copy each operand with a Transpose kernel first (40 of them in the default model's training step)
_BMM = ops.BatchMatMul()


def _attend(q, k, v, attn_mask, compiled: bool):
    """softmax(q k) v of scaled (and mask-extended) queries (B, Nkv, rep, l, D') and keys (B, Nkv, D', S), values
    (B, Nkv, S, D) -> (B, Nkv, rep, l, D)."""
    b, g, rep, seq, _ = q.shape
    scores = _BMM(q.reshape(b, g, rep * seq, -1), k).astype(ms.float32)  # (B, Nkv, rep*l, S); fp32 as SDPA
    if attn_mask is not None:  # (B|1, 1, l, S) broadcast over the heads
        scores = scores.reshape(b, g, rep, seq, -1) + (1.0 - attn_mask.astype(ms.float32)).unsqueeze(2) * _MASKED
        scores = scores.reshape(b, g, rep * seq, -1)
    probs = cpu_kernels.softmax(scores) if compiled else mint.nn.functional.softmax(scores, dim=-1)
    probs = probs.astype(v.dtype)
    return _BMM(probs, v).reshape(b, g, rep, seq, -1)


def flash_attention(q, k, v, key_mask, scale: float, attn_mask=None, kernel=None):
    """Ascend FlashAttentionScore (arguments as ``attention``): BSND layout, fp16/bf16 only, native GQA, mask True =
    discard. ``kernel`` replaces ``ops.flash_attention_score`` (the contract check passes its NumPy emulator)."""
    kernel = ops.flash_attention_score if kernel is None else kernel
    dtype = q.dtype
    if dtype not in _FA_DTYPES:
        q, k, v = q.astype(ms.float16), k.astype(ms.float16), v.astype(ms.float16)
    b, s_q, n, d = q.shape
    s_k = k.shape[1]
    d_pad = (d + 15) // 16 * 16  # FA wants head_dim % 16 == 0; zero columns change no dot product (scale is explicit)
    if d_pad != d:
        q, k, v = _pad_head(q, d_pad - d), _pad_head(k, d_pad - d), _pad_head(v, d_pad - d)
    keep = None if attn_mask is None else mint.broadcast_to(attn_mask.astype(ms.bool_), (b, 1, s_q, s_k))
    if key_mask is not None:
        by_key = mint.broadcast_to(key_mask.astype(ms.bool_)[:, None, None, :], (b, 1, s_q, s_k))
        keep = by_key if keep is None else mint.logical_and(keep, by_key)
    discard = None if keep is None else mint.logical_not(keep).astype(ms.uint8)  # (B, 1, L, S)
    out = kernel(q, k, v, n, attn_mask=discard, scalar_value=scale, input_layout="BSND")
    if d_pad != d:
        out = out[..., :d]
    return out.astype(dtype)


def _pad_head(x, width: int):
    """``width`` zero columns appended to the last axis, by concatenation: mint's pad (ConstantPadND) has no CPU
    kernel, and the contract check runs this preparation on CPU."""
    return mint.cat([x, mint.zeros(x.shape[:-1] + (width,), dtype=x.dtype)], dim=-1)


# ------------------------------------------------------------------------------------------------------------------
# Rotary position embedding
# ------------------------------------------------------------------------------------------------------------------
def apply_rope(x, cos, sin, fused: bool = False):
    """Rotate adjacent pairs of ``x`` (B, L, N, D) by the angles of ``cos``/``sin`` (L, D/2), in fp32, cast back to
    the dtype of ``x``: ``rope.apply_rope``, or Ascend's RotaryPositionEmbedding (``fused_rope``)."""
    if fused:
        return fused_rope(x, cos, sin)
    return rope.apply_rope(x, cos, sin)


def fused_rope(x, cos, sin, kernel=None):
    """Ascend RotaryPositionEmbedding in interleaved mode (mode 1, GPT-J style): the pair (x[2k], x[2k+1]) rotates by
    angle k, Lumina's complex pairing. The kernel takes full-width (D) tables of the dtype of ``x``, for a BSND
    ``x`` in the layout (1, L, 1, D), so each angle's cos and sin serve both members of its pair. ``x`` goes in as
    fp32, as the portable path computes. ``kernel`` replaces ``ops.rotary_position_embedding`` (contract check)."""
    kernel = ops.rotary_position_embedding if kernel is None else kernel
    seq, half = cos.shape
    c = mint.broadcast_to(cos.astype(ms.float32).unsqueeze(2), (seq, half, 2)).reshape(1, seq, 1, 2 * half)
    s = mint.broadcast_to(sin.astype(ms.float32).unsqueeze(2), (seq, half, 2)).reshape(1, seq, 1, 2 * half)
    return kernel(x.astype(ms.float32), c, s, 1).astype(x.dtype)  # (B, L, N, D)
