"""LoRA against peft 0.21.2 on diffusers 0.35.2 ``LuminaNextDiT2DModel`` (torch 2.13.0): adapter files exchanged
both ways give the same forward (relative error <= 1e-5, fp32), the adapter gradients equal torch autograd of the
diffusers+peft model, merged equals unmerged, unloading restores the base bit for bit, several adapters with their
own scales, and bad adapter files named."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from conftest import BUDGETS, rel_err
from diffusers import LuminaNextDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
from peft import LoraConfig, PeftModel, get_peft_model

import mindspore as ms
from mindspore import Tensor

from mindone_lumina import training
from mindone_lumina.models import flagdit, lora, nextdit
from mindone_lumina.parity import randomize_torch_
from mindone_lumina.weights import lora as lora_files
from mindone_lumina.weights.load import load_state_dict
from mindone_lumina.weights.nextdit import DIFFUSERS_RULES

FP32 = BUDGETS["fp32"]["transformer"]  # 1e-5
KW = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, qk_norm=True, learn_sigma=True,
          ffn_dim_multiplier=1.3, multiple_of=16, cross_attention_dim=24)  # fmt: skip
ALL_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
               "feed_forward.linear_1", "feed_forward.linear_2", "feed_forward.linear_3", "norm1.linear"]  # fmt: skip


def _config():
    return nextdit.NextDiTConfig(
        patch_size=2, in_channels=4, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
        ffn_dim_multiplier=1.3, learn_sigma=True, qk_norm=True, cap_feat_dim=24,
    )  # fmt: skip


def _base():
    """(diffusers model with equal query copies, project model with its weights)."""
    torch.manual_seed(0)
    ref = randomize_torch_(LuminaNextDiT2DModel(sample_size=16, patch_size=2, in_channels=4, **KW).eval(), seed=1)
    with torch.no_grad():
        for block in ref.layers:
            block.attn2.to_q.weight.copy_(block.attn1.to_q.weight)
            block.attn2.norm_q.load_state_dict(block.attn1.norm_q.state_dict())
    model = nextdit.NextDiT(_config())
    load_state_dict(model, {k: v.numpy() for k, v in ref.state_dict().items()}, DIFFUSERS_RULES)
    return ref, model


def _inputs(seed=2, batch=2, h=8, w=12, cap_len=7):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, h, w)).astype(np.float32)
    t = rng.uniform(0, 1, batch).astype(np.float32)
    cap = rng.standard_normal((batch, cap_len, 24)).astype(np.float32)
    mask = np.ones((batch, cap_len), np.int32)
    mask[0, 4:] = 0
    return x, t, cap, mask


def _torch_forward(ref, x, t, cap, mask):
    rope = get_2d_rotary_pos_embed_lumina(16, 384, 384)
    out = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cap), torch.from_numpy(mask), rope,
              cross_attention_kwargs={}, return_dict=False)[0]  # fmt: skip
    return out[:, :4]


def _ours(model, x, t, cap, mask):
    return nextdit.forward(model, *(Tensor(a) for a in (x, t, cap, mask))).asnumpy()


def _random_adapter(model, seed: int, std: float = 0.1, **config):
    """A new adapter on ``model`` with random A and B (a trained one: B is not zero)."""
    lora.add_adapter(model, lora.LoRAConfig(**config))
    rng = np.random.default_rng(seed)
    for p in lora.adapter_state(model).values():
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * std))


def _peft_adapter(ref, folder, tied: bool, seed=3, **config):
    """A peft adapter on the diffusers model, B drawn at random (peft starts B at zero), saved to ``folder``."""
    config = dict(r=4, lora_alpha=8, target_modules=ALL_TARGETS) | config
    peft_model = get_peft_model(ref, LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        if tied:  # the same adapter on both copies of the query, as one trained on the original model exports
            for block in peft_model.base_model.model.layers:
                for x in ("lora_A", "lora_B"):
                    getattr(block.attn2.to_q, x).default.weight.copy_(getattr(block.attn1.to_q, x).default.weight)
    peft_model.save_pretrained(folder)
    return peft_model


@pytest.mark.parametrize("tied", [True, False], ids=["tied-query", "peft-drawn"])
def test_peft_adapter_loads_here(tmp_path, tied, mode):
    ref, model = _base()
    peft_model = _peft_adapter(ref, str(tmp_path / "a"), tied, use_rslora=not tied)
    x, t, cap, mask = _inputs()
    with torch.no_grad():
        expected = _torch_forward(peft_model, x, t, cap, mask).numpy()
        with peft_model.disable_adapter():
            plain = _torch_forward(peft_model, x, t, cap, mask).numpy()
    plan = lora_files.apply_adapter(model, str(tmp_path / "a"))
    assert plan.untied == (not tied) and model.layers[0].attention.separate == (not tied)
    assert rel_err(_ours(model, x, t, cap, mask), expected) <= FP32
    assert rel_err(plain, expected) > 1e-2  # the adapter really changes the output
    lora.unload(model)
    assert not model.layers[0].attention.separate  # tied again
    assert rel_err(_ours(model, x, t, cap, mask), plain) <= FP32


def test_adapter_written_here_loads_in_peft(tmp_path, mode):
    ref, model = _base()
    _random_adapter(model, 5, rank=4, alpha=6, targets=("attention", "feed_forward", "adaln"))
    lora_files.save_adapter(model, str(tmp_path / "ours"), vocabulary=["a", "hexagon"])
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 6 and set(config["target_modules"]) == set(ALL_TARGETS)
    x, t, cap, mask = _inputs(seed=4)
    peft_model = PeftModel.from_pretrained(ref, str(tmp_path / "ours"))
    with torch.no_grad():
        expected = _torch_forward(peft_model, x, t, cap, mask).numpy()
    assert rel_err(_ours(model, x, t, cap, mask), expected) <= FP32
    # and read back here: the same tensors, the vocabulary from the metadata
    _, again = _base()
    plan = lora_files.apply_adapter(again, str(tmp_path / "ours"))
    assert not plan.untied and plan.vocabulary == ("a", "hexagon")
    assert rel_err(_ours(again, x, t, cap, mask), expected) <= FP32


def test_adapter_gradients_equal_torch_autograd(tmp_path, mode):
    """Only adapter tensors get gradients; each equals torch's (the tied query adapter: the sum over both copies)."""
    ref, model = _base()
    _random_adapter(model, 6, rank=4, alpha=8, targets=("attention", "feed_forward", "adaln"))
    lora_files.save_adapter(model, str(tmp_path / "g"))
    peft_model = PeftModel.from_pretrained(ref, str(tmp_path / "g"), is_trainable=True)
    x1, t, cap, mask = _inputs(seed=7)
    x0 = np.random.default_rng(8).standard_normal(x1.shape).astype(np.float32)
    xt = t.reshape(-1, 1, 1, 1) * x1 + (1 - t.reshape(-1, 1, 1, 1)) * x0
    v = _torch_forward(peft_model, xt, t, cap, mask)
    expected_loss = ((v - torch.from_numpy(x1 - x0)) ** 2).mean()
    expected_loss.backward()
    torch_grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                   for n, p in peft_model.named_parameters() if p.requires_grad}  # fmt: skip
    assert torch_grads and all(".lora_" in n for n in torch_grads)

    loss_cell = training.FlowMatchingLoss(model)
    named = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]
    assert named and all(".adapters." in n for n, _ in named)
    grad_fn = ms.value_and_grad(loss_cell, None, [p for _, p in named])
    grad_fn = ms.jit(grad_fn) if mode == "graph" else grad_fn
    loss, grads = grad_fn(*(Tensor(a) for a in (x1, x0, t, cap, mask)), *nextdit.rope_inputs(model.cfg, 8, 12, 1.0))
    assert abs(float(loss) - expected_loss.item()) <= 1e-6 * expected_loss.item()
    table = lora_files.layouts(model)[0].tied
    for (name, _), grad in zip(named, grads):
        key = name.replace(".adapters.0", "")
        expected = sum(torch_grads[s].numpy() for s in table.sources_of(key))
        assert rel_err(grad.asnumpy(), expected) <= 1e-5, name


def test_merged_equals_unmerged_and_unload_is_bitwise(tmp_path, pynative):
    ref, model = _base()
    before = {n: p.asnumpy().copy() for n, p in model.parameters_and_names()}
    x, t, cap, mask = _inputs(seed=9)
    plain = _ours(model, x, t, cap, mask)
    _peft_adapter(ref, str(tmp_path / "a"), tied=False)
    _peft_adapter(LuminaNextDiT2DModel(sample_size=16, patch_size=2, in_channels=4, **KW), str(tmp_path / "b"),
                  tied=False, seed=4, r=2, target_modules=["feed_forward.linear_1", "attn2.to_out.0"])  # fmt: skip
    lora_files.apply_adapter(model, str(tmp_path / "a"), scale=0.7)
    lora_files.apply_adapter(model, str(tmp_path / "b"), scale=-1.5)
    assert lora.adapter_names(model) == ["a", "b"]
    unmerged = _ours(model, x, t, cap, mask)
    # the scales act as peft's: each adapter's delta is scaled (checked on one layer)
    layer = lora.lora_layers(model)["layers.0.feed_forward.w1"]
    assert layer.names == ["a", "b"] and layer.adapters[0].scale == pytest.approx(0.7 * 8 / 4)
    assert layer.adapters[1].scale == pytest.approx(-1.5 * 8 / 2)
    lora.unload(model)
    after = dict(model.parameters_and_names())
    assert set(after) == set(before)
    assert all(np.array_equal(after[n].asnumpy(), v) for n, v in before.items())
    assert np.array_equal(_ours(model, x, t, cap, mask), plain)
    lora_files.apply_adapter(model, str(tmp_path / "a"), scale=0.7)
    lora_files.apply_adapter(model, str(tmp_path / "b"), scale=-1.5)
    lora.merge(model)
    assert model.cfg.separate_cross_query and not lora.lora_layers(model)
    assert rel_err(_ours(model, x, t, cap, mask), unmerged) <= 1e-6


def test_flagdit_adapter_round_trip(tmp_path, pynative):
    """Flag-DiT has no diffusers model: its adapters carry the original Lumina-T2X module names."""
    cfg = flagdit.FlagDiTConfig(patch_size=2, in_channels=4, dim=32, n_layers=2, n_heads=2, multiple_of=16,
                                cap_feat_dim=16, learn_sigma=False, qk_norm=True)  # fmt: skip
    ms.set_seed(0)
    model = flagdit.FlagDiT(cfg)
    paths = lora.add_adapter(model, lora.LoRAConfig(rank=2, alpha=2, targets=("attention", "adaln")))
    assert "layers.1.adaLN_modulation.1" in paths and "layers.0.attention.wk_y" in paths
    for p in lora.adapter_state(model).values():
        p.set_data(Tensor(np.random.default_rng(1).standard_normal(p.shape).astype(np.float32)))
    lora_files.save_adapter(model, str(tmp_path / "f"))
    keys = json.loads((tmp_path / "f" / "adapter_config.json").read_text())["target_modules"]
    assert "attention.wq" in keys and "adaLN_modulation.1" in keys
    state = {n: p.asnumpy() for n, p in lora.adapter_state(model).items()}
    lora.unload(model)
    lora_files.apply_adapter(model, str(tmp_path / "f"), name="default")
    assert all(np.array_equal(p.asnumpy(), state[n]) for n, p in lora.adapter_state(model).items())


def _folder(tmp_path, config_changes=None, drop=None, rename=None):
    ref, model = _base()
    _peft_adapter(ref, str(tmp_path / "src"), tied=True)
    folder = tmp_path / "src"
    if config_changes:
        cfg = json.loads((folder / "adapter_config.json").read_text()) | config_changes
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if drop or rename:
        from safetensors.numpy import load_file, save_file

        arrays = load_file(str(folder / "adapter_model.safetensors"))
        arrays = {(rename or {}).get(k, k): v for k, v in arrays.items() if k != drop}
        save_file(arrays, str(folder / "adapter_model.safetensors"))
    return model, str(folder)


@pytest.mark.parametrize("change, message", [
    (dict(config_changes={"use_dora": True}), "use_dora=True is not supported"),
    (dict(config_changes={"lora_alpha": 0}), "lora_alpha must be a positive number"),
    (dict(drop="base_model.model.layers.1.feed_forward.linear_2.lora_B.weight"),
     r"missing keys \(1\): layers.1.feed_forward.w2.lora_B"),
    (dict(rename={"base_model.model.layers.0.attn1.to_k.lora_A.weight": "base_model.model.layers.0.attn1.to_kk.lora_A"
                                                                        ".weight"}), "no adapter of a diffusers"),
])  # fmt: skip
def test_bad_adapters_are_named(tmp_path, change, message):
    model, folder = _folder(tmp_path, **change)
    before = [n for n, _ in model.parameters_and_names()]
    with pytest.raises(ValueError, match=message):
        lora_files.apply_adapter(model, folder)
    assert [n for n, _ in model.parameters_and_names()] == before  # nothing attached


def test_missing_adapter_files_and_config_errors(tmp_path):
    _, model = _base()
    with pytest.raises(ValueError, match="no adapter weights"):
        lora_files.apply_adapter(model, str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown lora key\(s\) \['ranks'\]"):
        lora.LoRAConfig.from_dict({"ranks": 4})
    with pytest.raises(ValueError, match="lora targets must be"):
        lora.LoRAConfig(targets=("attention", "mlp"))
    assert dataclasses.replace(lora.LoRAConfig(rank=4, alpha=8, rslora=True)).scaling == 4.0
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# The command lines: tools/sample.py --lora, tools/convert.py --merge-lora, on the bundled model
# ------------------------------------------------------------------------------------------------------------------
def _bundled_adapter(folder: str) -> None:
    from mindone_lumina import components
    from mindone_lumina.pipeline import DEFAULT_MODEL

    model = components.load_transformer(os.path.join(DEFAULT_MODEL, "transformer"))
    _random_adapter(model, 0, std=0.2, rank=2, alpha=2)
    lora_files.save_adapter(model, folder, vocabulary=["hexagon"])


def test_sample_with_lora_and_convert_merge_lora(tmp_path, capsys, caplog):
    from conftest import load_tool

    from mindone_lumina import cli
    from mindone_lumina.pipeline import DEFAULT_MODEL

    sample, convert = load_tool("sample"), load_tool("convert")
    adapter = str(tmp_path / "adapter")
    _bundled_adapter(adapter)
    fast = ["--steps", "3", "--solver", "euler", "--mode", "pynative", "--prompt", "a red hexagon on blue"]

    def latents(name, *extra):
        with pytest.raises(SystemExit) as done:
            cli.run(sample.main, [*fast, "--out", str(tmp_path / name), "--save-latents", str(tmp_path / name) +
                                  ".npz", *extra])  # fmt: skip
        assert done.value.code == 0, capsys.readouterr().err
        return np.load(str(tmp_path / name) + ".npz")["latents"]

    plain = latents("plain")
    assert "never saw the word(s) 'hexagon'" in caplog.text  # the bundled model's closed vocabulary
    caplog.clear()
    adapted = latents("lora", "--lora", adapter, "--lora-scale", "0.8")
    assert "hexagon" not in caplog.text  # the adapter's words join the vocabulary
    assert rel_err(adapted, plain) > 1e-2
    assert np.array_equal(latents("zero", "--lora", adapter, "--lora-scale", "0"), plain)  # scale 0: exactly the base
    with pytest.raises(SystemExit) as done:
        cli.run(convert.main, [DEFAULT_MODEL, str(tmp_path / "merged"), "--to", "diffusers", "--merge-lora", adapter,
                               "--lora-scale", "0.8"])  # fmt: skip
    assert done.value.code == 0 and "1 LoRA adapter(s) merged" in capsys.readouterr().out
    merged = latents("merged-run", "--model", str(tmp_path / "merged"))
    assert rel_err(merged, adapted) <= 1e-5
    settings = json.loads((tmp_path / "merged" / "mindone_lumina.json").read_text())
    assert "hexagon" in settings["vocabulary"]
    # diffusers reads the merged transformer, and it is peft's own merge of the adapter (at scale 0.8) on the base
    merged_ref = LuminaNextDiT2DModel.from_pretrained(str(tmp_path / "merged" / "transformer"))
    peft_model = PeftModel.from_pretrained(
        LuminaNextDiT2DModel.from_pretrained(os.path.join(DEFAULT_MODEL, "transformer")), adapter
    )
    for module in peft_model.modules():
        if hasattr(module, "set_scale") and hasattr(module, "lora_A"):
            module.set_scale("default", 0.8)
    peft_merged = dict(peft_model.merge_and_unload().named_parameters())
    with torch.no_grad():
        for name, p in merged_ref.named_parameters():
            assert rel_err(p.numpy(), peft_merged[name].numpy()) <= 1e-6, name


def test_shared_block_runner_runs_adapted_layers(tmp_path, mode):
    """The CPU graph-mode runner compiles one block for every layer: with adapters it copies their structure and
    scales; adapters whose scales differ by layer make the layers differ, and the pipeline runs the model itself."""
    ref, model = _base()
    _peft_adapter(ref, str(tmp_path / "a"), tied=False)
    lora_files.apply_adapter(model, str(tmp_path / "a"), scale=0.5)
    x, t, cap, mask = _inputs(seed=10)
    args = (*(Tensor(a) for a in (x, t, cap, mask)), *nextdit.rope_inputs(model.cfg, 8, 12, 1.0))
    assert nextdit.SharedBlockNextDiT.supports(model)
    shared = nextdit.SharedBlockNextDiT(model)(*args).asnumpy()
    assert rel_err(shared, model(*args).asnumpy()) <= 1e-6
    lora.lora_layers(model)["layers.1.attention.wk"].adapters[0].scale = 0.25
    assert not nextdit.SharedBlockNextDiT.supports(model)


def test_pipeline_unload_lora_restores_the_base(tmp_path, pynative):
    """pipeline.load_lora then unload_lora: the same latents as never loading it, and the base vocabulary."""
    from mindone_lumina.pipeline import DEFAULT_MODEL, TextToImagePipeline

    _bundled_adapter(str(tmp_path / "adapter"))
    pipe = TextToImagePipeline.from_pretrained(DEFAULT_MODEL)
    vocabulary = pipe.vocabulary
    run = lambda: pipe(["a red bar on blue"], num_steps=2, solver="euler", progress=False).latents  # noqa: E731
    plain = run()
    pipe.load_lora(str(tmp_path / "adapter"), 0.8)
    assert "hexagon" in pipe.vocabulary and rel_err(run(), plain) > 1e-2
    pipe.unload_lora()
    assert pipe.vocabulary == vocabulary and np.array_equal(run(), plain)
