"""Feature extraction into the sharded store (issue #27): what it stores equals the encoders' output, bad items are
skipped and counted by reason, a killed extraction resumes to the store an uninterrupted one writes, ranks split the
items, and a store made with other settings is refused. Tiny Gemma, pixel space (no VAE), CPU."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import load_tool
from PIL import Image

from mindone_lumina import components
from mindone_lumina.text import gemma
from mindone_lumina.training.data import TOO_SMALL, UNREADABLE, buckets, load_image
from mindone_lumina.training.extract import NO_CAPTION, NO_IMAGE, extract, store_meta
from mindone_lumina.training.feature_store import FeatureStore
from mindone_lumina.training.sources import read_items

BUCKETS = buckets(16, (1.0, 2.0), 8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    data = root / "data"
    data.mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i in range(9):
        size = (16, 16) if i % 3 else (12, 24)  # two buckets: square, and 2:1 wide
        Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(data / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a {'red blue green'.split()[i % 3]} square number {i}"})
    (data / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(data / "tiny.png")
    words = root / "vocabulary.jsonl"  # the tiny encoder's tokenizer learns these captions' words
    words.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows[2:2] = [{"image": "broken.png", "caption": "broken"}, {"image": "tiny.png", "caption": "tiny"},
                 {"image": "0.png"}, {"caption": "no image"}]  # fmt: skip
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoder = root / "text_encoder"
    args = ["--captions", str(words), "--out", str(encoder), "--hidden", "32", "--layers", "2"]
    load_tool("make_text_encoder").main(args + ["--heads", "2", "--vocab", "300"])
    model = components.load_text_encoder(str(encoder))
    return str(data), str(encoder), model, components.load_tokenizer(str(encoder), model.cfg)


def run(setup, out, rank=0, world=1, log=None, tokens=32):
    data, encoder, model, tokenizer = setup
    items = read_items(data)
    meta = store_meta(items, encoder, None, BUCKETS, tokens)
    return extract(items, str(out), meta, tokenizer, model, None, BUCKETS, tokens, rank, world, batch=3,
                   shard_bytes=4000, log=log or (lambda m: None))  # fmt: skip


def arrays(store):
    return {i: store[n] for n, i in enumerate(store.ids)}


def test_stored_features_equal_the_encoders_and_bad_items_are_counted(setup, tmp_path):
    data, _, model, tokenizer = setup
    skipped = run(setup, tmp_path / "store")
    store = FeatureStore(str(tmp_path / "store"))
    assert skipped == store.skipped == {UNREADABLE: 1, TOO_SMALL: 1, NO_CAPTION: 1, NO_IMAGE: 1}
    items = {i.id: i for i in read_items(data)}
    assert len(store) == 9 and len(store.ids) == len({f for f in store.ids})
    assert len([f for f in (tmp_path / "store").iterdir() if f.suffix == ".safetensors"]) > 3  # several shards
    for n, sample_id in enumerate(store.ids):
        item, got = items[sample_id], store[n]
        np.testing.assert_array_equal(got["latent"], load_image(item.image, BUCKETS))
        feats, mask = gemma.encode_prompts(tokenizer, model, [item.caption], negative_prompt=None, max_length=32)
        count = int(mask.asnumpy().sum())
        # encoded alone here, in a padded batch of 3 there: fp32 rounding of other matmul shapes
        np.testing.assert_allclose(got["cap_feats"], feats.asnumpy()[0, :count], rtol=1e-5, atol=1e-5)
    assert {store.shapes(n)["latent"] for n in range(len(store))} == {(3, 16, 16), (3, 8, 24)}
    empty = store.shared("empty_caption")["cap_feats"]
    feats, _ = gemma.encode_prompts(tokenizer, model, [""], negative_prompt=None, max_length=32)
    np.testing.assert_allclose(empty, feats.asnumpy()[0, :1], rtol=1e-5, atol=1e-5)  # BOS only


def test_a_killed_extraction_resumes_to_the_uninterrupted_store(setup, tmp_path):
    run(setup, tmp_path / "straight")
    calls = []

    def killed(message):
        calls.append(message)
        if len(calls) == 2:
            raise KeyboardInterrupt  # after the second batch

    with pytest.raises(KeyboardInterrupt):
        run(setup, tmp_path / "resumed", log=killed)
    partial = FeatureStore(str(tmp_path / "resumed"))
    assert 0 < len(partial) < 9
    lines = []
    run(setup, tmp_path / "resumed", log=lines.append)
    assert any("resuming" in line for line in lines)
    straight, resumed = FeatureStore(str(tmp_path / "straight")), FeatureStore(str(tmp_path / "resumed"))
    assert resumed.ids == straight.ids and resumed.skipped == straight.skipped
    a, b = arrays(straight), arrays(resumed)
    for i in a:
        for name in a[i]:
            np.testing.assert_array_equal(a[i][name], b[i][name])


def test_ranks_split_the_items_and_settings_are_checked(setup, tmp_path):
    for rank in range(2):
        run(setup, tmp_path / "store", rank=rank, world=2)
    store = FeatureStore(str(tmp_path / "store"))
    assert len(store) == 9 and store.skipped == {UNREADABLE: 1, TOO_SMALL: 1, NO_CAPTION: 1, NO_IMAGE: 1}
    with pytest.raises(ValueError, match=r"other settings: \['max_caption_tokens'\] differ"):
        run(setup, tmp_path / "store", tokens=16)
    data, encoder, model, tokenizer = setup
    items = read_items(data)
    items[5] = dataclasses.replace(items[5], caption="another caption")  # one entry edited
    meta = store_meta(items, encoder, None, BUCKETS, 32)
    with pytest.raises(ValueError, match=r"other settings: \['item_digest'\] differ"):
        extract(items, str(tmp_path / "store"), meta, tokenizer, model, None, BUCKETS, 32, log=lambda m: None)


def test_extract_features_cli(setup, tmp_path, capsys):
    data, encoder, _, _ = setup
    tool = load_tool("extract_features")
    args = ["--data", data, "--text-encoder", encoder, "--output", str(tmp_path / "store"), "--resolution", "16"]
    tool.main(args + ["--mode", "pynative"])
    assert len(FeatureStore(str(tmp_path / "store"))) == 9
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--text-encoder"):
        tool.main(["--data", data, "--text-encoder", str(tmp_path / "nope"), "--output", str(tmp_path / "s2")])


def test_msrun_extraction_writes_one_part_per_rank(setup, tmp_path):
    """2 CPU workers under msrun: parts r0 and r1, every item once in their union, the features of one process."""
    import os
    import socket
    import subprocess
    import sys

    data, encoder, _, _ = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    tool = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "extract_features.py")
    cmd = ["msrun", "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1", f"--master_port={port}",
           "--join=True", "--cluster_time_out=240", f"--log_dir={tmp_path / 'logs'}", tool, "--data", data,
           "--text-encoder", encoder, "--output", str(tmp_path / "store"), "--resolution", "16",
           "--batch", "3"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "store").glob("index-*.json")) == ["index-r0.json", "index-r1.json"]
    two = FeatureStore(str(tmp_path / "store"))
    load_tool("extract_features").main(["--data", data, "--text-encoder", encoder, "--output",
                                        str(tmp_path / "one"), "--resolution", "16", "--batch", "3"])  # fmt: skip
    one = FeatureStore(str(tmp_path / "one"))
    assert two.ids == one.ids and two.skipped == one.skipped and len(one) == 9
    a, b = arrays(one), arrays(two)
    for i in a:
        np.testing.assert_array_equal(a[i]["latent"], b[i]["latent"])
        np.testing.assert_allclose(a[i]["cap_feats"], b[i]["cap_feats"], rtol=1e-5, atol=1e-5)  # other batches
