"""LLaMA-2 encoder parity with transformers==4.57.1 ``LlamaModel`` (``last_hidden_state``) on tiny random configs,
fp32 relative Frobenius error <= 1e-5 in graph mode and PyNative; Lumina-T2I's prompt encoding (BOS + EOS, right
padding with 0, no attention mask); loading Hugging Face folders strictly."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import BUDGETS, SENTENCES, rel_err
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM, LlamaModel

import mindspore as ms
from mindspore import Tensor

from mindone_lumina import components
from mindone_lumina.text import llama
from mindone_lumina.text.tokenizers import load_tokenizer, train_tokenizer

FP32_BUDGET, FP16_BUDGET = BUDGETS["fp32"]["text_encoder"], BUDGETS["fp16"]["text_encoder"]
CONFIGS = {
    # multi-head, 2 layers
    "mha": dict(vocab_size=300, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, rms_norm_eps=1e-5, max_position_embeddings=64),
    # grouped kv heads (GQA, 3 query heads per kv head), other theta and eps
    "gqa": dict(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500.0, max_position_embeddings=64),
}  # fmt: skip


def _hf_model(kw, seed=0):
    torch.manual_seed(seed)
    model = LlamaModel(HFLlamaConfig(**kw, attn_implementation="eager")).eval()
    with torch.no_grad():  # norm weights around 1 (not exactly 1) so they take part in the comparison
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    kw = CONFIGS[request.param]
    ref = _hf_model(kw)
    folder = tmp_path_factory.mktemp(f"llama-{request.param}")
    ref.save_pretrained(folder)  # LlamaModel layout: no "model." prefix
    train_tokenizer(SENTENCES, kw["vocab_size"], "llama").save_pretrained(folder)
    return ref, components.load_text_encoder(str(folder)), str(folder)


def _batch(seed, vocab=300, batch=3, seq=9):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[1, 5:] = 0  # right padding
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_config_from_folder(pair):
    ref, encoder, _ = pair
    assert encoder.cfg.num_key_value_heads == ref.config.num_key_value_heads
    assert encoder.cfg.head_dim == ref.config.hidden_size // ref.config.num_attention_heads


def test_last_hidden_state_padded_batch(pair, mode):
    ref, encoder, _ = pair
    ids, mask = _batch(seed=1)
    out = encoder(Tensor(ids), Tensor(mask)).asnumpy()
    with torch.no_grad():
        expected = ref(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)).last_hidden_state
    assert rel_err(out, expected.numpy()) <= FP32_BUDGET


def test_encode_prompts_as_lumina_t2i(pair, mode):
    """Each prompt tokenized alone with BOS + EOS, right-padded with 0, the LM run without a mask (the demo)."""
    ref, encoder, folder = pair
    tokenizer = load_tokenizer(folder, "llama")
    prompts = SENTENCES[:2]
    cap_feats, cap_mask = llama.encode_prompts(tokenizer, encoder, prompts)
    rows = [tokenizer.encode(p) for p in [*prompts, ""]]
    assert all(r[0] == tokenizer.bos_token_id and r[-1] == tokenizer.eos_token_id for r in rows)
    assert rows[-1] == [tokenizer.bos_token_id, tokenizer.eos_token_id]  # the unconditional caption
    ids = np.zeros((4, max(map(len, rows))), np.int64)
    for i, r in enumerate([rows[0], rows[1], rows[2], rows[2]]):
        ids[i, : len(r)] = r
    assert cap_mask.asnumpy().tolist() == (ids != 0).astype(np.int32).tolist()
    with torch.no_grad():
        expected = ref(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()  # no attention mask, as the demo
    assert cap_feats.shape == (4, ids.shape[1], encoder.cfg.hidden_size)
    assert rel_err(cap_feats.asnumpy(), expected) <= FP32_BUDGET


def test_fp16(pair, pynative):
    ref, _, folder = pair
    encoder = components.load_text_encoder(folder, ms.float16)
    ids, mask = _batch(seed=2)
    out = encoder(Tensor(ids), Tensor(mask))
    assert out.dtype == ms.float16
    with torch.no_grad():
        expected = ref(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)).last_hidden_state
    assert rel_err(out.asnumpy(), expected.numpy()) <= FP16_BUDGET


def test_causal_lm_folder_drops_the_head(tmp_path, pynative):
    """A LlamaForCausalLM file (``model.`` prefix, untied ``lm_head``) loads into the same encoder."""
    kw = CONFIGS["gqa"]
    torch.manual_seed(3)
    lm = LlamaForCausalLM(HFLlamaConfig(**kw, tie_word_embeddings=False)).eval()
    lm.save_pretrained(tmp_path)
    encoder = components.load_text_encoder(str(tmp_path))
    ids, mask = _batch(seed=4)
    with torch.no_grad():
        expected = lm.model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
    assert rel_err(encoder(Tensor(ids), Tensor(mask)).asnumpy(), expected.last_hidden_state.numpy()) <= FP32_BUDGET


def test_bad_weights_and_configs_are_named(pair, tmp_path):
    _, encoder, folder = pair
    other = llama.LlamaConfig(**{**vars(encoder.cfg), "intermediate_size": encoder.cfg.intermediate_size + 8})
    with pytest.raises(ValueError, match=r"mis-shaped keys .*layers.0.mlp.gate_proj.weight"):
        components.load_text_encoder(folder, cfg=other)
    fewer = llama.LlamaConfig(**{**vars(encoder.cfg), "num_hidden_layers": 1})
    with pytest.raises(ValueError, match=r"unexpected keys .*layers.1.input_layernorm.weight"):
        components.load_text_encoder(folder, cfg=fewer)
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    with pytest.raises(ValueError, match="rope_scaling"):
        llama.LlamaConfig.from_hf_config({**hf, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="model_type 'gemma'"):
        llama.LlamaConfig.from_hf_config({**hf, "model_type": "gemma"})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads 3"):
        llama.LlamaConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_tokenizer(str(tmp_path), "llama")


def test_long_prompts_are_refused(pair):
    _, encoder, folder = pair
    tokenizer = load_tokenizer(folder, "llama")
    with pytest.raises(ValueError, match=r"prompt 0 is \d+ tokens long; the text encoder reads at most 64"):
        llama.encode_prompts(tokenizer, encoder, [" ".join(SENTENCES * 3)])
    with pytest.raises(ValueError, match="prompt 1 must be a string"):
        llama.encode_prompts(tokenizer, encoder, ["a", 3])


def test_preset():
    cfg = llama.PRESETS["llama-2-7b"]
    layer = 4 * cfg.hidden_size**2 + 3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size
    assert 2 * cfg.vocab_size * cfg.hidden_size + cfg.num_hidden_layers * layer + cfg.hidden_size == 6_738_415_616
