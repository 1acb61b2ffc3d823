"""LLaMA-2 (LLaMA-2-7B) as Lumina-T2I's prompt encoder: ``last_hidden_state`` of ``decoder.DecoderEncoder``.

Prompts are encoded as Lumina-T2I does (``lumina_t2i/demo.py``, spec section 1.2): each prompt tokenized alone with
BOS and EOS and no truncation, ids right-padded with 0, the LM called without an attention mask (causal attention
keeps the pads out of every real token), ``cap_mask`` 1 on real tokens.
"""

from dataclasses import dataclass

import numpy as np

from mindspore import Tensor

from .decoder import DecoderConfig
from .gemma import check_vocab
from .tokenizers import prompt_batch


@dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    MODEL_TYPE = "llama"
    DEFAULTS = dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    )  # fmt: skip  (kv heads = heads, head_dim = hidden / heads)

    @classmethod
    def check_hf(cls, hf: dict) -> None:
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"only the SiLU-gated MLP is supported, config asks for {hf['hidden_act']!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag, False):
                raise ValueError(f"{flag}=True is not LLaMA-2 and is not supported")


PRESETS = {"llama-2-7b": LlamaConfig()}  # meta-llama/Llama-2-7b-hf, Lumina-T2I's text encoder (hidden 4096)


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


def encode_prompts(tokenizer, encoder, prompts, negative_prompt=""):
    """Caption features for Flag-DiT, as ``gemma.encode_prompts`` returns them (rows [cond..., uncond...]), made the
    Lumina-T2I way (``tokenize``, then ``last_hidden_state`` of the LM run without a padding mask). ``""`` as the
    negative prompt is BOS, EOS."""
    ids, mask = tokenize(tokenizer, prompt_batch(prompts, negative_prompt), encoder.cfg.max_position_embeddings)
    check_vocab(ids, encoder.cfg)
    cap_feats = encoder(Tensor(ids), Tensor(np.ones_like(ids)))  # no padding mask, as the original
    return cap_feats, Tensor(mask)
