"""LoRA fine-tuning through the training stack: only the adapter trains (base bit-identical, optimizer and EMA over
the adapter only), checkpoints hold the adapter and resume exactly, fp16 keeps the frozen base in fp16, the export is
a peft folder that loads back, and bad LoRA recipes are named."""

import json
import os

import numpy as np
import pytest
from conftest import recipe
from safetensors.numpy import load_file

import mindspore as ms

from mindone_lumina import training
from mindone_lumina.models import lora, nextdit
from mindone_lumina.weights import lora as lora_files

LORA = {"rank": 4, "alpha": 4, "targets": ["attention", "feed_forward"]}


def _trained(trainer) -> dict:
    return {n: p.asnumpy() for n, p in zip(trainer.param_names, trainer.params)}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, data_and_encoder, base):
    """(recipe, trainer, log) of a LoRA fine-tune without dropout."""
    tmp = tmp_path_factory.mktemp("lora")
    cfg = training.TrainConfig.from_yaml(recipe(tmp, data_and_encoder, steps=40, save_every=40, lr=1e-2,
                                                init=base[0], lora=LORA))  # fmt: skip
    logs = []
    return cfg, training.train(cfg, log=logs.append), logs


def test_only_the_adapter_trains_and_the_export_loads_back(tmp_path, base, plain_run):
    _, weights = base
    cfg, trainer, logs = plain_run
    model = trainer.loss.model
    assert trainer.param_names and all(".adapters.0.lora_" in n for n in trainer.param_names)
    assert len(trainer.param_names) == 2 * 2 * 9  # 2 blocks x 9 layers (6 attention, 3 feed-forward) x (A, B)
    assert any("trained)" in line for line in logs)
    frozen = {n: p for n, p in model.parameters_and_names() if ".adapters." not in n}
    assert set(frozen) == set(weights) and all(np.array_equal(p.asnumpy(), weights[n]) for n, p in frozen.items())
    losses = np.array([loss for _, loss, _ in trainer.history])
    assert losses[-10:].mean() < 0.8 * losses[:10].mean()  # it learns
    assert any(np.abs(v).max() > 0 for n, v in _trained(trainer).items() if n.endswith("lora_B"))
    # the checkpoint holds the adapter only (model, EMA and AdamW's moments)
    ckpt = training.latest_checkpoint(cfg.output)
    assert set(load_file(os.path.join(ckpt, "model.safetensors"))) == set(trainer.param_names)
    assert len(load_file(os.path.join(ckpt, "optimizer.safetensors"))) <= 2 * len(trainer.param_names) + 4
    # export: a peft folder with the EMA adapter and the captions' words
    folder = str(tmp_path / "adapter")
    note = training.export_pipeline(cfg, trainer, folder)
    assert "tools/sample.py --lora" in note
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and "attn2.to_q" in config["target_modules"]
    fresh = nextdit.NextDiT(model.cfg)
    fresh.set_train(False)
    plan = lora_files.apply_adapter(fresh, folder)
    assert "red" in plan.vocabulary and not plan.untied
    ema = {n.replace(".adapters.0.", "."): e.asnumpy() for n, e in zip(trainer.param_names, trainer.ema)}
    for key, p in lora.adapter_state(fresh, "adapter").items():
        assert np.array_equal(p.asnumpy(), ema[key]), key


def test_lora_resume_equals_straight_run(tmp_path, data_and_encoder, base, plain_run):
    """With dropout: the masks follow the micro-batch, so a resumed run draws what the straight run drew."""
    kw = {"steps": 4, "save_every": 2, "init": base[0], "lora": {**LORA, "dropout": 0.3}, "ema_decay": 0.8,
          "lr": 1e-2}  # fmt: skip
    straight = training.train(training.TrainConfig.from_yaml(recipe(tmp_path / "a", data_and_encoder, **kw)))
    without = plain_run[1].history  # the same recipe without dropout (constant lr: the first steps are comparable)
    assert straight.history[0][1] == without[0][1]  # B = 0 at the start: dropout changes nothing yet
    assert straight.history[3][1] != without[3][1]  # then it does: the masks are applied in training
    path = recipe(tmp_path / "b", data_and_encoder, **kw)
    training.train(training.TrainConfig.from_yaml(path), stop_after=2)
    resumed = training.train(training.TrainConfig.from_yaml(path))
    for a, b in zip(straight.params, resumed.params):
        assert np.array_equal(a.asnumpy(), b.asnumpy()), a.name
    for a, b in zip(straight.ema, resumed.ema):
        assert np.array_equal(a.asnumpy(), b.asnumpy()), a.name


def test_fp16_lora_keeps_the_frozen_base_in_fp16(tmp_path, data_and_encoder, base):
    path = recipe(tmp_path, data_and_encoder, steps=4, save_every=4, init=base[0], lora=LORA, precision="fp16")
    trainer = training.train(training.TrainConfig.from_yaml(path))
    model = trainer.loss.model
    assert all(p.dtype == ms.float32 for p in trainer.params)  # adapter, its moments and EMA in fp32
    assert {p.dtype for n, p in model.parameters_and_names() if ".adapters." not in n} == {ms.float16}
    assert all(np.isfinite(loss) for _, loss, _ in trainer.history)


def test_dropout_masks_are_a_function_of_the_clock(pynative):
    """The masks: deterministic, independent across clocks and adapters, active in training mode only."""
    clock = ms.Parameter(ms.Tensor(3.0), requires_grad=False)
    masks = [lora.keep_mask((4, 50, 64), clock, salt, 0.25).asnumpy() for salt in (0.0, 0.0, 1.0)]
    assert np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[0], masks[2])
    assert abs(masks[0].mean() - 0.75) < 0.01 and set(np.unique(masks[0])) == {0.0, 1.0}
    clock.set_data(ms.Tensor(4.0))
    other = lora.keep_mask((4, 50, 64), clock, 0.0, 0.25).asnumpy()
    assert 0.5 < (other == masks[0]).mean() < 0.7  # independent masks agree on 0.75^2 + 0.25^2 of the elements
    adapter = lora.Adapter(64, 8, 2, 1.0, dropout=0.25, clock=clock)
    adapter.lora_B.set_data(ms.Tensor(np.ones((8, 2), np.float32)))
    x = ms.Tensor(np.ones((4, 50, 64), np.float32))
    eval_out = adapter(x).asnumpy()
    adapter.set_train(True)
    train_out = adapter(x).asnumpy()
    assert not np.allclose(eval_out, train_out) and np.allclose(eval_out, adapter.set_train(False)(x).asnumpy())


@pytest.mark.parametrize("change, message", [
    ({"lora": {"rank": 0}}, "lora rank must be a positive integer"),
    ({"lora": {"rank": 4, "target": ["attention"]}}, r"unknown lora key\(s\) \['target'\]"),
    ({"lora": {"targets": ["mlp"]}}, "lora targets must be"),
    ({"lora": [4]}, "lora must be a mapping"),
    ({"lora": {"rank": 4}, "init": None}, "lora fine-tunes a trained model: the recipe needs init"),
])  # fmt: skip
def test_bad_lora_recipes_are_named(tmp_path, data_and_encoder, base, change, message):
    kw = {"init": base[0]} | change
    with pytest.raises(ValueError, match=message):
        training.TrainConfig.from_yaml(recipe(tmp_path, data_and_encoder, **kw))
