"""Gemma-1 (Gemma-2B) as Lumina-Next's prompt encoder: ``hidden_states[-2]`` of ``decoder.DecoderEncoder``.

The MLP activation is always the tanh-approximate GELU. transformers 4.38-4.4x forced it for Gemma-1 whatever
``hidden_act`` said (Lumina-Next's features were made that way); 4.57.1 follows ``hidden_act``, and the hub config
of google/gemma-2b says ``"gelu"`` (exact). ``from_hf_config`` therefore ignores ``hidden_act`` and refuses an
explicit ``hidden_activation`` other than ``gelu_pytorch_tanh``.
"""

from dataclasses import dataclass

import numpy as np

from mindspore import Tensor

from .decoder import DecoderConfig
from .tokenizers import prompt_batch, warn_truncated


@dataclass(frozen=True)
class GemmaConfig(DecoderConfig):
    MODEL_TYPE = "gemma"
    DEFAULTS = dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                    num_attention_heads=8, num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                    max_position_embeddings=8192)  # fmt: skip
    NORM_OFFSET, SCALE_EMBEDDINGS, ACTIVATION, PENULTIMATE = True, True, "gelu_tanh", True

    @classmethod
    def check_hf(cls, hf: dict) -> None:
        if hf.get("hidden_activation") not in (None, "gelu_pytorch_tanh"):
            raise ValueError(f"only the tanh GELU is supported, config asks for {hf['hidden_activation']!r}")
        if hf.get("attention_bias", False):
            raise ValueError("attention_bias=True is not Gemma-1 and is not supported")
        if not hf.get("tie_word_embeddings", True):
            raise ValueError("untied word embeddings are not Gemma-1 and are not supported")


PRESETS = {"gemma-2b": GemmaConfig()}  # google/gemma-2b, Lumina-Next's text encoder


def encode_prompts(tokenizer, encoder, prompts, negative_prompt="", max_length: int = 256, pad_to_max: bool = False):
    """Caption features for Next-DiT, tokenized and encoded as Lumina-Next does (spec section 4).

    One tokenizer call on ``[prompts..., negatives...]`` (right padding to the longest row rounded up to a multiple
    of 8, at most ``max_length`` tokens, BOS prepended), then ``hidden_states[-2]`` of the encoder.

    Args:
        tokenizer: a Hugging Face Gemma tokenizer (``tokenizers.load_tokenizer``).
        encoder: a ``DecoderEncoder`` with a ``GemmaConfig``.
        prompts: a non-empty list of strings (a single string is one prompt).
        negative_prompt: the unconditional prompt: a string used for every row (``""`` = just BOS, the reference
            default), a list with one string per prompt, or None for conditional rows only.
        max_length: longest token sequence kept; longer prompts are truncated with a warning naming the count.
        pad_to_max: pad every row to ``max_length`` (one encoder shape for every call, e.g. training's online mode,
            where a graph per length would be compiled otherwise).

    Returns:
        ``(cap_feats, cap_mask)``: (B, Lc, hidden) Tensor in the encoder dtype and (B, Lc) int32 Tensor (1 = token),
        with rows ordered [cond..., uncond...] (B = 2 * len(prompts), or len(prompts) without negatives).
    """
    texts = prompt_batch(prompts, negative_prompt)
    if not isinstance(max_length, int) or not 0 < max_length <= encoder.cfg.max_position_embeddings:
        raise ValueError(f"max_length must be an int in [1, {encoder.cfg.max_position_embeddings}], got {max_length}")
    tokens = tokenizer(texts, padding="max_length" if pad_to_max else True, pad_to_multiple_of=8,
                       max_length=max_length, truncation=True, padding_side="right", return_tensors="np")  # fmt: skip
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    check_vocab(ids, encoder.cfg)
    warn_truncated(tokenizer, texts, mask.sum(axis=1), max_length)
    cap_feats = encoder(Tensor(ids.astype(np.int32)), Tensor(mask.astype(np.int32)))
    return cap_feats, Tensor(mask.astype(np.int32))


def check_vocab(ids: np.ndarray, cfg: DecoderConfig) -> None:
    if ids.max() >= cfg.vocab_size:
        raise ValueError(
            f"the tokenizer produced id {ids.max()} but the encoder has vocab_size {cfg.vocab_size}: "
            "tokenizer and weights do not belong together"
        )
