"""LLaMA-2 (LLaMA-2-7B) as Lumina-T2I's prompt encoder, in MindSpore: ``last_hidden_state`` of ``LlamaModel``.

Ported from transformers 4.57.1 ``models/llama/modeling_llama.py`` (``LlamaModel``, Apache-2.0). Parameter names are
those of ``LlamaModel``, so a Hugging Face checkpoint loads by stripping ``model.`` (``HF_RULES``). LLaMA differs
from Gemma (``gemma.py``) in its RMSNorm (``normalise(x).to(dtype) * w``, not ``(1 + w)``, = ``layers.RMSNorm``), its
SiLU-gated MLP, the final norm being part of the output, and no embedding scaling; the attention (rotate-half RoPE,
grouped kv heads, causal + padding mask) and the token lookup are Gemma's and are imported from ``gemma.py``.

Prompts are encoded as Lumina-T2I does (``lumina_t2i/demo.py``, spec section 1.2): each prompt tokenized alone with
BOS and EOS and no truncation, ids right-padded with 0, the LM called without an attention mask (causal attention
keeps the pads out of every real token), ``cap_mask`` 1 on real tokens. No KV cache, no LM head.
"""

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Tensor, mint, nn
from mindspore.nn.utils import no_init_parameters

from . import backend
from .checkpoint_io import open_checkpoint
from .convert import RuleTable, convert_tensors
from .gemma import GemmaAttention, GemmaEmbedding, _prompt_batch
from .layers import RMSNorm, linear


# ------------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Hugging Face ``LlamaConfig`` that change the encoder's output (same names)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096

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
    def from_hf_config(cls, hf: dict) -> "LlamaConfig":
        """From a Hugging Face Llama ``config.json`` dict; fields that do not change the output are ignored."""
        if hf.get("model_type") != "llama":
            raise ValueError(f"expected a LLaMA config (model_type 'llama'), got model_type {hf.get('model_type')!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"only the SiLU-gated MLP is supported, config asks for {hf['hidden_act']!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag, False):
                raise ValueError(f"{flag}=True is not LLaMA-2 and is not supported")
        if hf.get("rope_scaling") is not None:
            raise ValueError(f"rope_scaling {hf['rope_scaling']!r} is not LLaMA-2 and is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        args = {k: v for k, v in hf.items() if k in fields and v is not None}
        args.setdefault("num_key_value_heads", hf.get("num_attention_heads", cls.num_attention_heads))
        if "head_dim" not in args and "hidden_size" in hf and "num_attention_heads" in hf:
            args["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
        return cls(**args)


PRESETS = {
    "llama-2-7b": LlamaConfig(),  # meta-llama/Llama-2-7b-hf, Lumina-T2I's text encoder (hidden 4096)
}


# ------------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------------
class LlamaMLP(nn.Cell):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def construct(self, x):
        return self.down_proj(mint.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Cell):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = GemmaAttention(cfg)  # reads the same config field names
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def construct(self, x, cos, sin, key_mask, causal):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask, causal)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, L, hidden)


# ------------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------------
class LlamaEncoder(nn.Cell):
    """LLaMA decoder stack returning transformers' ``last_hidden_state`` (final norm applied).

    ``construct(input_ids, attention_mask)``: (B, L) integer ids and (B, L) mask (1 = token, right padding; all ones
    = no mask, as Lumina-T2I calls the LM) -> (B, L, hidden) in the parameter dtype.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = GemmaEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.CellList([LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # RoPE angles as transformers makes them: fp32 inverse frequencies times fp32 positions, one rounding each
        exponent = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
        self.inv_freq = Tensor(1.0 / np.float32(cfg.rope_theta) ** exponent, ms.float32)  # (D/2,)
        self.positions = Tensor(np.arange(cfg.max_position_embeddings, dtype=np.float32))  # also the causal order

    def construct(self, input_ids, attention_mask):
        seq = input_ids.shape[1]
        h = self.embed_tokens(input_ids)  # (B, L, hidden), no scaling (unlike Gemma)
        pos = self.positions[:seq]  # (L,)
        angles = pos[:, None] * self.inv_freq[None, :]  # (L, D/2)
        angles = mint.cat((angles, angles), dim=-1)  # (L, D)
        cos, sin = mint.cos(angles).astype(h.dtype), mint.sin(angles).astype(h.dtype)
        causal = (pos[None, :] <= pos[:, None])[None, None]  # (1, 1, L, L), True = key not in the future
        key_mask = attention_mask.astype(ms.bool_)  # (B, L)
        for layer in self.layers:
            h = layer(h, cos, sin, key_mask, causal)
        return self.norm(h)  # (B, L, hidden)


# ------------------------------------------------------------------------------------------------------------------
# Prompt encoding (spec section 1.2)
# ------------------------------------------------------------------------------------------------------------------
def tokenize(tokenizer, texts, max_length: int):
    """Lumina-T2I's batch: each text encoded alone (BOS + EOS, no truncation), right-padded with id 0.

    Returns ``(ids, mask)`` int32 arrays (B, L) with L the longest row; ``ValueError`` if a row exceeds ``max_length``.
    """
    rows = [tokenizer.encode(text, truncation=False) for text in texts]
    for i, row in enumerate(rows):
        if len(row) > max_length:
            raise ValueError(f"prompt {i} is {len(row)} tokens long; the text encoder reads at most {max_length}")
    ids = np.zeros((len(rows), max(len(r) for r in rows)), np.int32)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask


def encode_prompts(tokenizer, encoder: LlamaEncoder, prompts, negative_prompt=""):
    """Caption features for Flag-DiT, tokenized and encoded as Lumina-T2I does (``tokenize``, then
    ``last_hidden_state`` of the LM run without a padding mask).

    Args:
        tokenizer: a LLaMA tokenizer adding BOS and EOS (``load_tokenizer``).
        encoder: a ``LlamaEncoder`` (``load_llama``).
        prompts: a non-empty list of strings (a single string is one prompt).
        negative_prompt: the unconditional prompt: a string for every row (``""`` = BOS, EOS, the reference default),
            a list with one string per prompt, or None for conditional rows only.

    Returns:
        ``(cap_feats, cap_mask)``: (B, Lc, hidden) Tensor in the encoder dtype and (B, Lc) int32 Tensor (1 = token),
        with rows ordered [cond..., uncond...].
    """
    ids, mask = tokenize(tokenizer, _prompt_batch(prompts, negative_prompt), encoder.cfg.max_position_embeddings)
    if ids.max() >= encoder.cfg.vocab_size:
        raise ValueError(
            f"the tokenizer produced id {ids.max()} but the encoder has vocab_size {encoder.cfg.vocab_size}: "
            "tokenizer and weights do not belong together"
        )
    cap_feats = encoder(Tensor(ids), Tensor(np.ones_like(ids)))  # no padding mask, as the original
    return cap_feats, Tensor(mask)


# ------------------------------------------------------------------------------------------------------------------
# Loading from a local Hugging Face LLaMA folder (the only code here that reads files)
# ------------------------------------------------------------------------------------------------------------------
def load_tokenizer(folder: str):
    """The folder's tokenizer with BOS and EOS added and right padding, as ``lumina_t2i/demo.py`` loads it."""
    if not os.path.isdir(folder):
        raise ValueError(f"tokenizer folder not found: {folder}")
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model")):
        raise ValueError(f"{folder} has no tokenizer: expected tokenizer.json or tokenizer.model")
    from transformers import AutoTokenizer  # the tokenizer is the reference's; imported only when needed

    tokenizer = AutoTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=True)
    tokenizer.padding_side = "right"
    return tokenizer


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE trained on ``texts`` as a ``LlamaTokenizerFast`` with LLaMA's special ids (<unk> 0, <s> 1,
    </s> 2) adding BOS and EOS: any text encodes. For small models and tests; Lumina-T2I uses LLaMA-2's own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    texts = list(texts)
    if not texts or vocab_size < 259:
        raise ValueError(f"need at least one text and vocab_size >= 259 (bytes + specials), got {vocab_size}")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = LlamaTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True,
        add_eos_token=True, legacy=True,
    )  # fmt: skip
    tokenizer.padding_side = "right"
    return tokenizer


def read_config(folder: str) -> LlamaConfig:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            return LlamaConfig.from_hf_config(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the LLaMA config {path}: {e}") from e


def load_llama(folder: str, dtype=ms.float32, cfg: LlamaConfig | None = None) -> LlamaEncoder:
    """A ``LlamaEncoder`` with the weights of a Hugging Face LLaMA folder (``LlamaModel`` or ``LlamaForCausalLM``,
    single or sharded safetensors or .bin).

    ``cfg`` defaults to the folder's ``config.json``. Names and shapes are checked strictly from the file headers
    before any parameter is allocated (``ValueError`` naming the keys); parameters are then filled in ``dtype`` one
    tensor at a time, so peak memory is the model plus one tensor (LLaMA-2-7B: 13.5 GB in fp16, 27 GB in fp32).
    """
    backend.check_dtype_supported(dtype)
    cfg = read_config(folder) if cfg is None else cfg
    with no_init_parameters():
        encoder = LlamaEncoder(cfg)
    ckpt = _WithoutKeys(open_checkpoint(folder), _not_in_llama_model)
    table = HF_RULES if any(k.startswith("model.") for k in ckpt.keys()) else None  # None: saved from LlamaModel
    params = {p.name: p for p in encoder.get_parameters()}
    specs = convert_tensors(
        ckpt, table, {n: tuple(p.shape) for n, p in params.items()}, what=f"LLaMA weights in {folder} (config {cfg})"
    )
    np_dtype = np.float16 if dtype == ms.float16 else np.float32
    for spec in specs:  # strict: every parameter is filled exactly once
        params[spec.name].set_dtype(dtype)
        params[spec.name].set_data(Tensor(spec.fetch().astype(np_dtype, copy=False), dtype=dtype))
    return encoder


def _not_in_llama_model(key: str) -> bool:
    """The LM head of ``LlamaForCausalLM`` (AutoModel drops it too) and the RoPE buffers old conversions stored."""
    return key == "lm_head.weight" or key.endswith("rotary_emb.inv_freq")


class _WithoutKeys:
    """A checkpoint reader that hides the keys ``drop(key)`` selects."""

    def __init__(self, reader, drop):
        self.reader, self._keys = reader, [k for k in reader.keys() if not drop(k)]

    def keys(self):
        return list(self._keys)

    def shape(self, key: str) -> tuple:
        return self.reader.shape(key)

    def dtype(self, key: str) -> str:
        return self.reader.dtype(key)

    def read(self, key: str):
        return self.reader.read(key)


# ------------------------------------------------------------------------------------------------------------------
# Checkpoint layout: Hugging Face ``LlamaForCausalLM`` files prefix the ``LlamaModel`` names with ``model.``.
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
    "llama-hf",
    (
        ("embed_tokens.weight", ("model.embed_tokens.weight",)),
        *((f"layers.{{i}}.{k}", (f"model.layers.{{i}}.{k}",)) for k in _LAYER_KEYS),
        ("norm.weight", ("model.norm.weight",)),
    ),
)
