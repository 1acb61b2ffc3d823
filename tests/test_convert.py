"""Weight conversion: every input format -> MindSpore safetensors -> forward equals the reference; exports round-trip
bit for bit; bad inputs fail with a ValueError naming the problem; pickles cannot run code.

References: the original Lumina-T2X outputs in ``fixtures/original-nextdit-tiny`` (commit 1c60696, torch 2.13.0) and
diffusers==0.35.2 ``LuminaNextDiT2DModel``. Budgets: fp32 relative Frobenius error <= 1e-5; a diffusers forward run in
bfloat16 <= 1.5e-2; round trips and casts exact (bit-identical).
"""

import copy
import dataclasses
import importlib.util
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUDGETS, FIXTURES, randomize_torch_, rel_err
from diffusers import LuminaNextDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
from safetensors.numpy import save_file
from safetensors.torch import load_file as torch_load_file

import mindspore as ms
from mindspore import Tensor

from mindone_lumina import atomic, components
from mindone_lumina.io import diffusers_io
from mindone_lumina.models import nextdit
from mindone_lumina.weights import checkpoints, tensors, torch_pickle
from mindone_lumina.weights.load import load_state_dict
from mindone_lumina.weights.nextdit import NEXTDIT
from mindone_lumina.weights.rules import RuleTable, convert_tensors
from mindone_lumina.weights.safetensors import SafetensorsFile, write_safetensors

FP32_BUDGET, BF16_BUDGET = BUDGETS["fp32"]["transformer"], BUDGETS["bf16"]["transformer"]
ORIGINAL = os.path.join(FIXTURES, "original-nextdit-tiny")
DIFFUSERS_KW = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, multiple_of=16,
                    cross_attention_dim=32, qk_norm=True, learn_sigma=True)  # fmt: skip

_spec = importlib.util.spec_from_file_location(
    "convert_cli", os.path.join(os.path.dirname(FIXTURES), "..", "tools", "convert.py")
)
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


pytestmark = pytest.mark.usefixtures("pynative")


def load_state(path, arch=None, **kw):
    """Project name -> array of any Next-DiT checkpoint: the converter's plan, read whole."""
    return {s.name: s.fetch() for s in components.transformer_plan(path, arch, **kw)[2]}


def _original_state():
    return checkpoints.read_state_dict(os.path.join(ORIGINAL, "consolidated.00-of-01.safetensors"))


def _load_converted(path, cfg):
    """Load a converted file the MindSpore way (load_checkpoint + load_param_into_net, every name used) and the
    project way (strict)."""
    params = ms.load_checkpoint(path, format="safetensors")
    model = nextdit.NextDiT(cfg)
    not_loaded, unused = ms.load_param_into_net(model, params)  # not strict_load: a bf16 file loads into fp32
    assert not not_loaded and not unused, (not_loaded, unused)
    load_state_dict(model, {k: v.asnumpy() for k, v in params.items()})  # the project's strict loader agrees
    return model


# ------------------------------------------------------------------------------------------------------------------
# Original Lumina-T2X checkpoints: safetensors, .pth, and 2 model-parallel ranks
# ------------------------------------------------------------------------------------------------------------------
def _fairscale_dim(key):
    """Split axis of each tensor in lumina_next_t2i/models/model.py with 2 ranks: ColumnParallelLinear weight and
    bias -> 0, RowParallelLinear weight -> 1 (bias whole), per-rank gate / qk LayerNorms -> 0, plain norms whole."""
    if key.endswith(("attention.wo.weight", "feed_forward.w2.weight", "t_embedder.mlp.2.weight")):
        return 1
    replicated = ("pad_token", "t_embedder.mlp.2.bias", "cap_embedder.0.weight", "cap_embedder.0.bias")
    plain_norms = ("attention_norm1.weight", "attention_norm2.weight", "ffn_norm1.weight", "ffn_norm2.weight",
                   "attention_y_norm.weight")  # fmt: skip
    return None if key in replicated or key.endswith(plain_norms) else 0


def _write_ranks(folder, state, world, ext):
    os.makedirs(folder, exist_ok=True)
    for rank in range(world):
        part = {}
        for k, v in state.items():
            dim = _fairscale_dim(k)
            part[k] = v if dim is None else np.ascontiguousarray(np.split(v, world, axis=dim)[rank])
        name = os.path.join(folder, f"consolidated.{rank:02d}-of-{world:02d}.{ext}")
        if ext == "pth":
            torch.save({k: torch.from_numpy(v) for k, v in part.items()}, name)
        else:
            save_file(part, name)
    shutil.copy(os.path.join(ORIGINAL, "model_args.json"), folder)


@pytest.mark.parametrize("source", ["safetensors", "pth", "mp2-safetensors", "mp2-pth"])
def test_original_to_mindspore_forward_matches_original_code(source, tmp_path):
    if source.startswith("mp2"):
        src = str(tmp_path / "ranks")
        _write_ranks(src, _original_state(), 2, source.split("-")[1])
        extra = ["--allow-inexact-merge"]  # the fixture has qk_norm; these ranks are slices of a world-1 model
    else:
        src = str(tmp_path / "single")
        os.makedirs(src)
        shutil.copy(os.path.join(ORIGINAL, f"consolidated.00-of-01.{source}"), src)
        shutil.copy(os.path.join(ORIGINAL, "model_args.json"), src)
        extra = []
    out = str(tmp_path / "nextdit.safetensors")
    cli.main([src, out, "--verify", *extra])

    cfg = nextdit.resolve_config(os.path.join(ORIGINAL, "model_args.json"))
    io = np.load(os.path.join(ORIGINAL, "io.npz"))
    model = _load_converted(out, cfg)
    got = nextdit.forward(model, *(Tensor(io[k]) for k in ("x", "t", "cap_feats", "cap_mask"))).asnumpy()
    assert rel_err(got, io["out"]) <= FP32_BUDGET
    # the in-memory path (tools/forward.py) reads the same source to the same weights
    state = load_state(src, allow_inexact_merge=bool(extra))
    assert all(np.array_equal(state[k], v) for k, v in _original_state().items())


def test_model_parallel_checks(tmp_path):
    src = str(tmp_path / "ranks")
    _write_ranks(src, _original_state(), 2, "safetensors")
    with pytest.raises(ValueError, match=r"per-rank qk LayerNorms \(layers\.0\.attention\.k_norm"):
        load_state(src)  # refused unless asked: the merged LayerNorm is another function

    rank1 = os.path.join(src, "consolidated.01-of-02.safetensors")
    reader = SafetensorsFile(rank1)
    part = {k: reader.read(k) for k in reader.keys()}
    part["pad_token"] = part["pad_token"] + 1  # replicated tensors must be equal on every rank
    save_file(part, rank1)
    with pytest.raises(ValueError, match=r"'pad_token' should be replicated .*consolidated\.01-of-02"):
        load_state(src, allow_inexact_merge=True)

    os.remove(rank1)
    with pytest.raises(ValueError, match=r"shard\(s\) missing: \['consolidated\.01-of-02\.safetensors'\]"):
        load_state(src)


def test_ema_weights_are_picked_with_ema(tmp_path):
    state = _original_state()
    save_file(state, str(tmp_path / "consolidated.00-of-01.safetensors"))
    save_file({k: v + 1 for k, v in state.items()}, str(tmp_path / "consolidated_ema.00-of-01.safetensors"))
    shutil.copy(os.path.join(ORIGINAL, "model_args.json"), tmp_path)
    cli.main([str(tmp_path), str(tmp_path / "ema.safetensors"), "--ema"])
    ema = checkpoints.read_state_dict(str(tmp_path / "ema.safetensors"))
    assert all(np.array_equal(ema[k], v + 1) for k, v in state.items())
    assert NEXTDIT.recorded_config(str(tmp_path / "ema.safetensors")) == nextdit.resolve_config(
        os.path.join(ORIGINAL, "model_args.json")
    )  # recorded in the output's metadata
    with pytest.raises(ValueError, match="no consolidated_ema"):
        load_state(os.path.join(ORIGINAL), ema=True)


def test_original_round_trip_is_bit_exact(tmp_path):
    ms_file, back = str(tmp_path / "ms.safetensors"), str(tmp_path / "original")
    cli.main(
        [
            os.path.join(ORIGINAL, "consolidated.00-of-01.pth"),
            ms_file,
            "--arch",
            os.path.join(ORIGINAL, "model_args.json"),
        ]
    )
    cli.main([ms_file, back, "--to", "original", "--verify"])
    reference = torch_load_file(os.path.join(ORIGINAL, "consolidated.00-of-01.safetensors"))
    result = torch_load_file(os.path.join(back, "consolidated.00-of-01.safetensors"))
    assert sorted(result) == sorted(reference)
    for k, v in reference.items():  # same dtype, shape and bytes
        assert result[k].dtype == v.dtype and torch.equal(result[k].view(torch.uint8), v.view(torch.uint8)), k
    with open(os.path.join(back, "model_args.json")) as f, open(os.path.join(ORIGINAL, "model_args.json")) as g:
        assert json.load(f) == json.load(g)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dtype_cast_rounds_like_torch(dtype, tmp_path):
    out = str(tmp_path / "cast.safetensors")
    cli.main([ORIGINAL, out, "--dtype", dtype, "--verify"])
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    result = torch_load_file(out)
    for k, v in torch_load_file(os.path.join(ORIGINAL, "consolidated.00-of-01.safetensors")).items():
        expected = v.to(torch_dtype)  # round to nearest even, the reference cast
        assert result[k].dtype == torch_dtype and torch.equal(result[k].view(torch.uint8), expected.view(torch.uint8))
    assert (
        ms.load_checkpoint(out, format="safetensors")["pad_token"].dtype
        == {"fp16": ms.float16, "bf16": ms.bfloat16}[dtype]
    )


# ------------------------------------------------------------------------------------------------------------------
# diffusers LuminaNextDiT2DModel folders: single file, sharded index, bfloat16
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_model():
    torch.manual_seed(0)
    ref = randomize_torch_(LuminaNextDiT2DModel(sample_size=16, patch_size=2, in_channels=4, **DIFFUSERS_KW), seed=3)
    with torch.no_grad():  # diffusers keeps wq / q_norm twice; released checkpoints hold equal copies
        for block in ref.layers:
            block.attn2.to_q.weight.copy_(block.attn1.to_q.weight)
            block.attn2.norm_q.load_state_dict(block.attn1.norm_q.state_dict())
    return ref.eval()


def _inputs(cfg, batch=2, h=8, w=12, cap_len=7):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((batch, cfg.in_channels, h, w)).astype(np.float32)
    t = rng.uniform(0, 1, batch).astype(np.float32)
    cap = rng.standard_normal((batch, cap_len, cfg.cap_feat_dim)).astype(np.float32)
    mask = np.ones((batch, cap_len), np.int32)
    mask[0, 4:] = 0
    return x, t, cap, mask


def _diffusers_forward(ref, cfg, x, t, cap, mask, dtype=torch.float32):
    rope = get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384)
    with torch.no_grad():
        out = ref(torch.from_numpy(x).to(dtype), torch.from_numpy(t), torch.from_numpy(cap).to(dtype),
                  torch.from_numpy(mask), rope, cross_attention_kwargs={}, return_dict=False)[0]  # fmt: skip
    return out.chunk(2, dim=1)[0].float().numpy()  # velocity half of the learned-sigma output


@pytest.mark.parametrize("variant", ["fp32", "sharded", "bf16"])
def test_diffusers_to_mindspore_forward_matches_diffusers(variant, diffusers_model, tmp_path):
    ref = diffusers_model
    if variant == "bf16":
        ref = LuminaNextDiT2DModel.from_config(ref.config).eval()
        ref.load_state_dict(diffusers_model.state_dict())
        ref = ref.to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="200KB" if variant == "sharded" else "10GB")
    if variant == "sharded":
        assert os.path.isfile(tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
    out = str(tmp_path / "nextdit.safetensors")
    cli.main([str(tmp_path / "pipe"), out, "--verify"])  # architecture from transformer/config.json

    cfg = components.transformer_plan(str(tmp_path / "pipe"))[1]
    assert cfg == diffusers_io.transformer_config(dict(ref.config))
    x, t, cap, mask = _inputs(cfg)
    model = _load_converted(out, cfg)
    got = nextdit.forward(model, Tensor(x), Tensor(t), Tensor(cap), Tensor(mask)).asnumpy()
    # same (bf16-valued) weights, both in fp32: the conversion itself must be exact
    assert rel_err(got, _diffusers_forward(ref.float(), cfg, x, t, cap, mask)) <= FP32_BUDGET
    if variant == "bf16":  # and diffusers computing in bf16 agrees within bf16 precision
        bf16_out = _diffusers_forward(ref.to(torch.bfloat16), cfg, x, t, cap, mask, torch.bfloat16)
        assert rel_err(got, bf16_out) <= BF16_BUDGET


def test_diffusers_round_trip_and_export_loads_in_diffusers(diffusers_model, tmp_path):
    ref = copy.deepcopy(diffusers_model).to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "src")
    ms_file, back = str(tmp_path / "ms.safetensors"), str(tmp_path / "back")
    cli.main([str(tmp_path / "src"), ms_file])
    cli.main([ms_file, back, "--to", "diffusers", "--verify"])
    source = torch_load_file(str(tmp_path / "src" / "diffusion_pytorch_model.safetensors"))
    result = torch_load_file(os.path.join(back, "transformer", "diffusion_pytorch_model.safetensors"))
    assert sorted(result) == sorted(source)
    for k, v in source.items():
        assert result[k].dtype == torch.bfloat16 and torch.equal(result[k].view(torch.int16), v.view(torch.int16)), k

    reloaded = LuminaNextDiT2DModel.from_pretrained(os.path.join(back, "transformer")).eval()  # config.json is valid
    assert reloaded.config.sample_size == 128  # the released model's latent size; Next-DiT itself has no such field
    assert {k: v for k, v in reloaded.config.items() if not k.startswith("_") and k != "sample_size"} == {
        k: v for k, v in ref.config.items() if not k.startswith("_") and k != "sample_size"
    }
    cfg = diffusers_io.transformer_config(dict(ref.config))
    x, t, cap, mask = _inputs(cfg)
    expected = _diffusers_forward(ref.float(), cfg, x, t, cap, mask)
    assert rel_err(_diffusers_forward(reloaded.float(), cfg, x, t, cap, mask), expected) <= FP32_BUDGET


def test_untied_diffusers_queries_load_as_separate_cross_attention(diffusers_model, tmp_path):
    """A diffusers model whose attn2 query differs from attn1's (as diffusers trains both) converts to a model with
    its own cross-attention query that equals diffusers' forward, exports back to diffusers bit for bit, and is
    refused by the original layout (it has one query)."""
    untied = copy.deepcopy(diffusers_model)
    with torch.no_grad():
        untied.layers[1].attn2.to_q.weight.add_(0.05 * torch.randn(untied.layers[1].attn2.to_q.weight.shape))
        untied.layers[0].attn2.norm_q.weight.add_(0.1)
    untied.save_pretrained(tmp_path / "src")
    out, back = str(tmp_path / "ms.safetensors"), str(tmp_path / "back")
    cli.main([str(tmp_path / "src"), out, "--verify"])
    cfg = NEXTDIT.recorded_config(out)
    assert cfg.separate_cross_query
    model = _load_converted(out, cfg)
    x, t, cap, mask = _inputs(cfg)
    got = nextdit.forward(model, Tensor(x), Tensor(t), Tensor(cap), Tensor(mask)).asnumpy()
    assert rel_err(got, _diffusers_forward(untied, cfg, x, t, cap, mask)) <= FP32_BUDGET
    assert rel_err(got, _diffusers_forward(diffusers_model, cfg, x, t, cap, mask)) > 1e-3  # the copies matter
    cli.main([out, back, "--to", "diffusers", "--verify"])
    source = torch_load_file(str(tmp_path / "src" / "diffusion_pytorch_model.safetensors"))
    result = torch_load_file(os.path.join(back, "transformer", "diffusion_pytorch_model.safetensors"))
    assert sorted(result) == sorted(source) and all(torch.equal(result[k], v) for k, v in source.items())
    with pytest.raises(ValueError, match="has one query projection"):
        cli.main([out, str(tmp_path / "original"), "--to", "original"])


def test_pth_reader_matches_torch_for_dtypes_and_views(tmp_path):
    """Storages shared by several tensors, offsets, transposed strides and every dtype the checkpoints use."""
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    tensors = {"t": base.t(), "slice": base[2:5, 1:7], "row": base[3], "bf16": base.to(torch.bfloat16),
               "fp16": base.half(), "int64": torch.arange(5), "bool": base > 0, "empty": base[:0]}  # fmt: skip
    torch.save(tensors, tmp_path / "x.pth")
    reader = checkpoints.open_checkpoint(str(tmp_path / "x.pth"))
    assert sorted(reader.keys()) == sorted(tensors)
    for k, v in tensors.items():
        expected = (v.float() if v.dtype == torch.bfloat16 else v).numpy()  # bf16 arrives widened, exactly
        got = reader.read(k)
        assert got.dtype == expected.dtype and got.shape == expected.shape and np.array_equal(got, expected), k
    assert reader.dtype("bf16") == "bfloat16" and reader.shape("t") == (8, 6)


# ------------------------------------------------------------------------------------------------------------------
# Pickles never run code
# ------------------------------------------------------------------------------------------------------------------
def _payload(module: str, name: str, marker) -> bytes:
    """A pickle whose loading calls ``module.name("touch marker")``, stored as a state-dict entry."""
    return f"}}(Vx_embedder.weight\nc{module}\n{name}\n(Vtouch {marker}\ntRu.".encode()


def _torch_zip(path, pickled: bytes):
    """A file laid out like torch.save's zip, holding ``pickled`` as its data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("module, name", [("os", "system"), ("posix", "system"), ("subprocess", "getoutput")])
def test_malicious_pickle_is_refused_and_runs_nothing(module, name, tmp_path):
    marker = tmp_path / "pwned"
    payload = _payload(module, name, marker)
    path = tmp_path / "consolidated.00-of-01.pth"
    _torch_zip(path, payload)
    with pytest.raises(ValueError, match=rf"refused to unpickle the global {module}\.{name}"):
        checkpoints.open_checkpoint(str(path))
    with pytest.raises(ValueError, match="refused to unpickle"):
        torch_pickle.read_pickle(str(path))  # the model_args.pth path too
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: unrestricted unpickling runs it
    assert marker.exists()


def test_legacy_plain_pickle_is_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    path.write_bytes(_payload("os", "system", marker))
    with pytest.raises(ValueError, match="legacy .* non-zip"):
        checkpoints.open_checkpoint(str(path))
    assert not marker.exists()


def test_model_args_pth_is_read_without_torch_load(tmp_path):
    import argparse

    shutil.copy(os.path.join(ORIGINAL, "consolidated.00-of-01.safetensors"), tmp_path)
    torch.save(
        argparse.Namespace(model="NextDiT_2B_GQA_patch2", qk_norm=True, image_size=1024), tmp_path / "model_args.pth"
    )
    assert NEXTDIT.recorded_config(str(tmp_path)) == nextdit.PRESETS["nextdit-2b-gqa"]


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs: each raises ValueError naming the problem
# ------------------------------------------------------------------------------------------------------------------
LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 6509584522\n"
)


@pytest.mark.parametrize("name", ["consolidated.00-of-01.safetensors", "consolidated.00-of-01.pth", "model_args.pth"])
def test_git_lfs_pointer_is_named(name, tmp_path):
    if name == "model_args.pth":  # weights fine, architecture read from the pointer
        shutil.copy(os.path.join(ORIGINAL, "consolidated.00-of-01.safetensors"), tmp_path)
    else:
        shutil.copy(os.path.join(ORIGINAL, "model_args.json"), tmp_path)
    (tmp_path / name).write_text(LFS_POINTER)
    with pytest.raises(ValueError, match=rf"{name} is a git-LFS pointer file, not the weights of 6\.51 GB"):
        load_state(str(tmp_path))


@pytest.mark.parametrize("ext", ["safetensors", "pth"])
def test_truncated_file(ext, tmp_path):
    data = open(os.path.join(ORIGINAL, f"consolidated.00-of-01.{ext}"), "rb").read()
    path = tmp_path / f"consolidated.00-of-01.{ext}"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=rf"consolidated\.00-of-01\.{ext} is truncated"):
        load_state(str(tmp_path), os.path.join(ORIGINAL, "model_args.json"))


def test_corrupt_safetensors_header(tmp_path):
    data = bytearray(open(os.path.join(ORIGINAL, "consolidated.00-of-01.safetensors"), "rb").read())
    data[8:12] = b"####"  # the JSON header no longer parses
    path = tmp_path / "broken.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"broken\.safetensors: corrupt safetensors header"):
        checkpoints.open_checkpoint(str(path))


def test_missing_shard_of_an_index(diffusers_model, tmp_path):
    diffusers_model.save_pretrained(tmp_path, max_shard_size="200KB")
    with open(tmp_path / "diffusion_pytorch_model.safetensors.index.json") as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(ValueError, match=rf"names shard\(s\) missing .*\['{shard}'\]"):
        load_state(str(tmp_path))


@pytest.mark.parametrize(
    "edit, message",
    [
        ("drop", r"missing keys \(1\): layers\.1\.attention\.gate"),
        ("add", r"unexpected keys \(1\): layers\.1\.attention\.extra"),
        ("reshape", r"mis-shaped keys \(1\): layers\.1\.attention\.gate expected \(4,\) got \(2, 2\)"),
    ],
)
def test_key_mismatches_are_named(edit, message, tmp_path):
    state = _original_state()
    if edit == "drop":
        del state["layers.1.attention.gate"]
    elif edit == "add":
        state["layers.1.attention.extra"] = np.zeros(3, np.float32)
    else:
        state["layers.1.attention.gate"] = state["layers.1.attention.gate"].reshape(2, 2)
    save_file(state, str(tmp_path / "consolidated.00-of-01.safetensors"))
    with pytest.raises(ValueError, match=message):
        cli.main(
            [str(tmp_path), str(tmp_path / "out.safetensors"), "--arch", os.path.join(ORIGINAL, "model_args.json")]
        )
    assert not os.path.exists(tmp_path / "out.safetensors")


def test_existing_output_needs_force_and_failed_writes_leave_nothing(tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(ValueError, match=r"out\.safetensors already exists; pass --force to replace it"):
        cli.main([ORIGINAL, str(out)])
    assert out.read_bytes() == b"precious"
    cli.main([ORIGINAL, str(out), "--force"])
    assert len(SafetensorsFile(str(out)).keys()) == len(_original_state())

    def fail():
        raise RuntimeError("interrupted")

    spec = tensors.TensorSpec("a", (2,), "float32", lambda: np.zeros(2, np.float32))
    with pytest.raises(RuntimeError, match="interrupted"):
        write_safetensors(str(tmp_path / "new.safetensors"), [spec, dataclasses.replace(spec, name="b", fetch=fail)])
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]  # no partial file, no temporary left behind


def test_any_rule_table_drives_the_conversion(tmp_path):
    """The machinery is model-agnostic: a two-row table, with a stored copy, over a sharded folder."""
    table = RuleTable("toy", (("net.w", ("enc.w", "enc.w_copy")), ("net.b{i}", ("enc.bias{i}",))))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    save_file({"enc.w": w, "enc.bias0": np.ones(4, np.float16)}, str(tmp_path / "a.safetensors"))
    save_file({"enc.w_copy": w, "enc.bias1": np.zeros(4, np.float16)}, str(tmp_path / "b.safetensors"))
    weight_map = {"enc.w": "a.safetensors", "enc.bias0": "a.safetensors", "enc.w_copy": "b.safetensors",
                  "enc.bias1": "b.safetensors"}  # fmt: skip
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": weight_map}, f)
    reader = checkpoints.open_checkpoint(str(tmp_path))
    specs = convert_tensors(reader, table, {"net.w": (3, 4), "net.b0": (4,), "net.b1": (4,)}, dtype="fp32")
    assert [(s.name, s.dtype) for s in specs] == [("net.b0", "float32"), ("net.b1", "float32"), ("net.w", "float32")]
    assert np.array_equal(specs[2].fetch(), w) and np.array_equal(specs[0].fetch(), np.ones(4))
    with pytest.raises(ValueError, match=r"missing keys \(1\): net\.b2"):
        convert_tensors(reader, table, {"net.w": (3, 4), "net.b0": (4,), "net.b1": (4,), "net.b2": (4,)})


def test_staged_folder_publishes_only_on_success(tmp_path):
    """Every exporter writes through ``staged_folder``: the folder appears whole and world-readable, or not at all."""
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.staged_folder(str(out)) as tmp:
            Path(tmp, "half.json").write_text("{")
            raise RuntimeError("disk full")
    assert not out.exists() and os.listdir(tmp_path) == []  # nothing half-written, no temporary left behind
    with atomic.staged_folder(str(out)) as tmp:
        Path(tmp, "a.json").write_text("{}")
    assert os.listdir(out) == ["a.json"] and os.stat(out).st_mode & 0o777 == 0o755
    with pytest.raises(ValueError, match=f"{out} exists and is not empty"):
        with atomic.staged_folder(str(out)):
            pass
