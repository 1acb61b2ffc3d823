"""Gemma-1 (Gemma-2B) as Lumina-Next's prompt encoder, in MindSpore: ``hidden_states[-2]`` of the decoder stack.

Ported from transformers 4.57.1 ``models/gemma/modeling_gemma.py`` (``GemmaModel``, Apache-2.0). Parameter names are
those of ``GemmaModel``, so a Hugging Face checkpoint loads by stripping ``model.`` (``HF_RULES``). Behaviour kept from
the reference, including its dtype quirks: embeddings times ``sqrt(hidden)`` rounded to the model dtype, RMSNorm
``x * (1 + w)`` computed in fp32 and cast at the end, RoPE (rotate-half layout) with fp32 angles cast to the model
dtype, causal + padding mask, softmax in fp32. Deviations, all deliberate:

* The encoder returns the output of the second-to-last decoder layer (what Lumina-Next feeds Next-DiT, spec section 4)
  and never runs the last layer or the final norm: one layer of 18 less work. Their weights are still parameters, so
  Hugging Face checkpoints load strictly (every key consumed).
* The MLP activation is always the tanh-approximate GELU. transformers 4.38-4.4x forced it for Gemma-1 whatever
  ``hidden_act`` said (Lumina-Next's features were made that way); 4.57.1 follows ``hidden_act``, and the hub config
  of google/gemma-2b says ``"gelu"`` (exact). ``from_hf_config`` therefore ignores ``hidden_act`` and rejects an
  explicit ``hidden_activation`` other than ``gelu_pytorch_tanh``.
* No KV cache, no LM head (Gemma ties it to the embeddings; ``lm_head.weight``, when a file has it, must equal them).
"""

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops

from . import backend
from .checkpoint_io import open_checkpoint, staged_folder
from .convert import RuleTable, rename_to_project
from .layers import cast_parameters, linear
from .loading import load_state_dict


# ------------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmaConfig:
    """The fields of a Hugging Face ``GemmaConfig`` that change the encoder's output (same names)."""

    vocab_size: int = 256000
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be positive, got {getattr(self, f.name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"rotate-half RoPE needs an even head_dim, got {self.head_dim}")

    @classmethod
    def from_hf_config(cls, hf: dict) -> "GemmaConfig":
        """From a Hugging Face Gemma ``config.json`` dict; fields that do not change the output are ignored."""
        if hf.get("model_type", "gemma") != "gemma":
            raise ValueError(f"expected a Gemma-1 config (model_type 'gemma'), got model_type {hf['model_type']!r}")
        if hf.get("hidden_activation") not in (None, "gelu_pytorch_tanh"):
            raise ValueError(f"only the tanh GELU is supported, config asks for {hf['hidden_activation']!r}")
        if hf.get("attention_bias", False):
            raise ValueError("attention_bias=True is not Gemma-1 and is not supported")
        if hf.get("rope_scaling") is not None:
            raise ValueError(f"rope_scaling {hf['rope_scaling']!r} is not supported")
        if not hf.get("tie_word_embeddings", True):
            raise ValueError("untied word embeddings are not Gemma-1 and are not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        args = {k: v for k, v in hf.items() if k in fields}
        if "head_dim" not in args and "hidden_size" in hf and "num_attention_heads" in hf:
            args["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
        return cls(**args)


PRESETS = {
    "gemma-2b": GemmaConfig(),  # google/gemma-2b, Lumina-Next's text encoder
}


# ------------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------------
class GemmaRMSNorm(nn.Cell):
    """``x * rsqrt(mean(x^2) + eps) * (1 + w)``, all in fp32, cast to the input dtype at the end (unlike LLaMA)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(Tensor(np.zeros(dim, np.float32)))  # zero = identity scale

    def construct(self, x):
        x32 = x.astype(ms.float32)
        y = x32 * ops.rsqrt(mint.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.astype(ms.float32))).astype(x.dtype)


class GemmaMLP(nn.Cell):
    """GeGLU: ``down(gelu_tanh(gate(x)) * up(x))``."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused = backend.use_fused_kernels()

    def construct(self, x):
        return self.down_proj(backend.gelu_tanh(self.gate_proj(x), self.fused) * self.up_proj(x))


class GemmaAttention(nn.Cell):
    """Causal self-attention with rotate-half RoPE and grouped (multi-query in Gemma-2B) kv heads."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5
        self.fused = backend.use_fused_kernels()

    def construct(self, x, cos, sin, key_mask, causal):
        b, seq, _ = x.shape
        q = _rotate(self.q_proj(x).reshape(b, seq, self.n_heads, self.head_dim), cos, sin)  # (B, L, N, D)
        k = _rotate(self.k_proj(x).reshape(b, seq, self.n_kv_heads, self.head_dim), cos, sin)  # (B, L, Nkv, D)
        v = self.v_proj(x).reshape(b, seq, self.n_kv_heads, self.head_dim)
        out = backend.attention(q, k, v, key_mask, self.scale, self.fused, attn_mask=causal)  # (B, L, N, D)
        return self.o_proj(out.reshape(b, seq, -1))  # (B, L, hidden)


def _rotate(x, cos, sin):
    """HF ``apply_rotary_pos_emb``: ``x cos + rotate_half(x) sin`` with (L, D) tables, in the dtype of ``x``."""
    half = x.shape[-1] // 2
    rotated = mint.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1).unsqueeze(0) + rotated * sin.unsqueeze(1).unsqueeze(0)  # (1, L, 1, D) tables


class GemmaDecoderLayer(nn.Cell):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.self_attn = GemmaAttention(cfg)
        self.mlp = GemmaMLP(cfg)
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def construct(self, x, cos, sin, key_mask, causal):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask, causal)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, L, hidden)


class GemmaEmbedding(nn.Cell):
    """Token lookup through ``ops.gather`` (``mint.nn.functional.embedding`` has no CPU kernel in PyNative)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = Parameter(Tensor(np.zeros((vocab_size, dim), np.float32)))  # values come from a checkpoint

    def construct(self, input_ids):
        return ops.gather(self.weight, input_ids, 0)  # (B, L, hidden)


# ------------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------------
class GemmaEncoder(nn.Cell):
    """Gemma decoder stack returning transformers' ``hidden_states[-2]``.

    transformers 4.57.1 records ``hidden_states`` as (input of layer 0, outputs of layers 0 .. n-2, final norm of the
    output of layer n-1), so ``[-2]`` is the raw output of layer n-2: layers 0 .. n-2 are run, nothing after.

    ``construct(input_ids, attention_mask)``: (B, L) integer ids and (B, L) mask (1 = token, right padding) ->
    (B, L, hidden) in the parameter dtype. Rows at padded positions are computed but meaningless.
    """

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = GemmaEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.CellList([GemmaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # loaded, never run (see module docstring)
        self.n_run = cfg.num_hidden_layers - 1
        self.normalizer = math.sqrt(cfg.hidden_size)
        # RoPE angles as transformers makes them: fp32 inverse frequencies times fp32 positions, one rounding each
        exponent = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
        self.inv_freq = Tensor(1.0 / np.float32(cfg.rope_theta) ** exponent, ms.float32)  # (D/2,)
        self.positions = Tensor(np.arange(cfg.max_position_embeddings, dtype=np.float32))  # also the causal order

    def construct(self, input_ids, attention_mask):
        seq = input_ids.shape[1]
        h = self.embed_tokens(input_ids)  # (B, L, hidden)
        h = h * Tensor(self.normalizer, h.dtype)  # rounded to the model dtype first, as the reference does
        pos = self.positions[:seq]  # (L,)
        angles = pos[:, None] * self.inv_freq[None, :]  # (L, D/2)
        angles = mint.cat((angles, angles), dim=-1)  # (L, D)
        cos, sin = mint.cos(angles).astype(h.dtype), mint.sin(angles).astype(h.dtype)
        causal = (pos[None, :] <= pos[:, None])[None, None]  # (1, 1, L, L), True = key not in the future
        key_mask = attention_mask.astype(ms.bool_)  # (B, L)
        for i in range(self.n_run):
            h = self.layers[i](h, cos, sin, key_mask, causal)
        return h  # (B, L, hidden)


# ------------------------------------------------------------------------------------------------------------------
# Prompt encoding (spec section 4)
# ------------------------------------------------------------------------------------------------------------------
def encode_prompts(tokenizer, encoder: GemmaEncoder, prompts, negative_prompt="", max_length: int = 256):
    """Caption features for Next-DiT, tokenized and encoded as Lumina-Next does.

    One tokenizer call on ``[prompts..., negatives...]`` (right padding to the longest row rounded up to a multiple
    of 8, at most ``max_length`` tokens, BOS prepended), then ``hidden_states[-2]`` of the encoder.

    Args:
        tokenizer: a Hugging Face Gemma tokenizer (``load_tokenizer``).
        encoder: a ``GemmaEncoder`` (``load_gemma``).
        prompts: a non-empty list of strings (a single string is one prompt).
        negative_prompt: the unconditional prompt: a string used for every row (``""`` = just BOS, the reference
            default), a list with one string per prompt, or None for conditional rows only.
        max_length: longest token sequence kept; longer prompts are truncated with a warning naming the count.

    Returns:
        ``(cap_feats, cap_mask)``: (B, Lc, hidden) Tensor in the encoder dtype and (B, Lc) int32 Tensor (1 = token),
        with rows ordered [cond..., uncond...] (B = 2 * len(prompts), or len(prompts) without negatives).
    """
    texts = _prompt_batch(prompts, negative_prompt)
    if not isinstance(max_length, int) or not 0 < max_length <= encoder.cfg.max_position_embeddings:
        raise ValueError(f"max_length must be an int in [1, {encoder.cfg.max_position_embeddings}], got {max_length}")
    tokens = tokenizer(
        texts,
        padding=True,
        pad_to_multiple_of=8,
        max_length=max_length,
        truncation=True,
        padding_side="right",
        return_tensors="np",
    )
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    if ids.max() >= encoder.cfg.vocab_size:
        raise ValueError(
            f"the tokenizer produced id {ids.max()} but the encoder has vocab_size {encoder.cfg.vocab_size}: "
            "tokenizer and weights do not belong together"
        )
    _warn_truncated(tokenizer, texts, mask.sum(axis=1), max_length)
    cap_feats = encoder(Tensor(ids.astype(np.int32)), Tensor(mask.astype(np.int32)))
    return cap_feats, Tensor(mask.astype(np.int32))


def _prompt_batch(prompts, negative_prompt) -> list:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list | tuple) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} must be a string, got {type(p).__name__} {p!r}")
    if negative_prompt is None:
        return list(prompts)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
    if not isinstance(negatives, list | tuple) or len(negatives) != len(prompts):
        raise ValueError(
            f"negative_prompt must be a string, None, or a list of {len(prompts)} strings, got {negative_prompt!r}"
        )
    for i, p in enumerate(negatives):
        if not isinstance(p, str):
            raise ValueError(f"negative prompt {i} must be a string, got {type(p).__name__} {p!r}")
    return list(prompts) + list(negatives)


def _warn_truncated(tokenizer, texts, kept_lengths, max_length: int):
    """Rows that filled ``max_length`` may have been cut; count the lost tokens with an untruncated call."""
    full = [i for i, n in enumerate(kept_lengths) if n >= max_length]
    if not full:
        return
    lengths = [len(ids) for ids in tokenizer([texts[i] for i in full])["input_ids"]]
    for i, n in zip(full, lengths):
        if n > max_length:
            warnings.warn(
                f"prompt {i} is {n} tokens long; truncated to max_length={max_length} ({n - max_length} tokens cut)",
                stacklevel=3,
            )


# ------------------------------------------------------------------------------------------------------------------
# Loading from a local Hugging Face Gemma folder (the only code here that reads files)
# ------------------------------------------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # either one is enough for GemmaTokenizerFast


def load_tokenizer(folder: str):
    """``GemmaTokenizerFast`` from ``folder``, with the right padding Lumina-Next uses (not stored in the folder)."""
    if not os.path.isdir(folder):
        raise ValueError(f"tokenizer folder not found: {folder}")
    if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"{folder} has no tokenizer: expected one of {list(TOKENIZER_FILES)}")
    from transformers import GemmaTokenizerFast  # the tokenizer is the reference's; imported only when needed

    tokenizer = GemmaTokenizerFast.from_pretrained(folder)
    tokenizer.padding_side = "right"
    return tokenizer


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE trained on ``texts`` as a right-padding ``GemmaTokenizerFast`` with Gemma's special ids
    (<pad> 0, <eos> 1, <bos> 2, <unk> 3) and BOS prepended: any text encodes. For small models and tests; a real
    Lumina-Next uses Gemma's own tokenizer (``load_tokenizer``). Save it with ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GemmaTokenizerFast

    texts = list(texts)
    if not texts or vocab_size < 260:
        raise ValueError(f"need at least one text and vocab_size >= 260 (bytes + specials), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bars go to stdout, into the tables of the scripts that build tokenizers
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = GemmaTokenizerFast(
        tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.padding_side = "right"
    return tokenizer


def read_config(folder: str) -> GemmaConfig:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            return GemmaConfig.from_hf_config(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the Gemma config {path}: {e}") from e


def save_gemma(folder: str, cfg: GemmaConfig, state: Mapping, tokenizer) -> None:
    """Write a Hugging Face ``GemmaModel`` folder (config.json, model.safetensors, tokenizer files) that
    ``load_gemma`` and transformers read; files go to a temporary folder renamed at the end."""
    from safetensors.numpy import save_file

    with staged_folder(folder) as tmp:
        hf = {**dataclasses.asdict(cfg), "model_type": "gemma", "architectures": ["GemmaModel"],
              "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "pad_token_id": 0,
              "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True, "torch_dtype": "float32"}  # fmt: skip
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=1)
        save_file(
            {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, os.path.join(tmp, "model.safetensors")
        )
        tokenizer.save_pretrained(tmp)


def random_gemma_state(cfg: GemmaConfig, seed: int = 0, std: float = 0.02) -> dict:
    """GemmaModel-named weights as the Hugging Face initialiser draws them (normal(0, std), norm weights 0 = scale 1):
    a frozen random encoder for small models trained from scratch, whose features still identify the tokens."""
    rng = np.random.default_rng(seed)
    return {
        p.name: (np.zeros(p.shape) if "norm" in p.name else std * rng.standard_normal(p.shape)).astype(np.float32)
        for p in GemmaEncoder(cfg).get_parameters()
    }


def load_gemma(folder: str, dtype=ms.float32, cfg: GemmaConfig | None = None) -> GemmaEncoder:
    """A ``GemmaEncoder`` with the weights of a Hugging Face Gemma folder (single or sharded safetensors).

    ``cfg`` defaults to the folder's ``config.json``; weights that do not fit it raise ``ValueError`` naming the keys.
    Names and shapes are checked from the file headers first; tensors are then read and cast one at a time, so peak
    memory is the model plus one tensor (bf16 files are widened exactly by ``checkpoint_io``).
    """
    backend.check_dtype_supported(dtype)
    cfg = read_config(folder) if cfg is None else cfg
    encoder = cast_parameters(GemmaEncoder(cfg), dtype)
    ckpt = open_checkpoint(folder)
    table = HF_RULES if any(k.startswith("model.") for k in ckpt.keys()) else None  # None: saved from GemmaModel
    names = [p.name for p in encoder.get_parameters()]
    np_dtype = np.float16 if dtype == ms.float16 else np.float32
    try:
        state = rename_to_project(_LazyState(ckpt, np_dtype), table, expected=names)
    except ValueError as e:
        raise ValueError(f"{folder}: weights do not fit {cfg}: {e}") from e
    load_state_dict(encoder, state, strict=True, what=f"Gemma weights in {folder} (config {cfg})")
    return encoder


class _LazyState(Mapping):
    """A checkpoint as a name -> array mapping whose values know their shape and are read only when converted."""

    def __init__(self, ckpt, np_dtype):
        self.ckpt, self.np_dtype = ckpt, np_dtype

    def __getitem__(self, key):
        return _LazyArray(self.ckpt, key, self.np_dtype)

    def __iter__(self):
        return iter(self.ckpt.keys())

    def __len__(self):
        return len(self.ckpt.keys())


class _LazyArray:
    """``np.shape`` reads ``.shape`` (the file header); ``np.asarray`` reads the tensor, cast to the model dtype."""

    def __init__(self, ckpt, key: str, np_dtype):
        self.ckpt, self.key, self.np_dtype = ckpt, key, np_dtype
        self.shape = tuple(ckpt.shape(key))

    def __array__(self, dtype=None, copy=None):
        return self.ckpt.read(self.key).astype(dtype or self.np_dtype, copy=False)


# ------------------------------------------------------------------------------------------------------------------
# Checkpoint layout: Hugging Face ``GemmaForCausalLM`` files prefix the ``GemmaModel`` names with ``model.``; a
# ``lm_head.weight`` (absent from the hub files, Gemma ties it) must be an exact copy of the embeddings.
# Import only: exporting would write the tied head as well.
# ------------------------------------------------------------------------------------------------------------------
_LAYER_KEYS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)

HF_RULES = RuleTable(
    "gemma-hf",
    (
        ("embed_tokens.weight", ("model.embed_tokens.weight", "lm_head.weight")),
        *((f"layers.{{i}}.{k}", (f"model.layers.{{i}}.{k}",)) for k in _LAYER_KEYS),
        ("norm.weight", ("model.norm.weight",)),
    ),
)
