"""The training data pipeline (issue #27): batches from a feature store follow the seeded plan whatever the number of
loader workers, an epoch is every sample once (split over ranks), a pipeline started mid-epoch continues the same
sequence, and the online source reads and encodes the same batches as the store holds, replacing a file that broke
after the scan. Tiny Gemma, pixel space (no VAE), CPU."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from conftest import load_tool
from PIL import Image

from mindone_lumina import components
from mindone_lumina.training import TrainConfig, loader
from mindone_lumina.training.data import buckets
from mindone_lumina.training.extract import extract, store_meta
from mindone_lumina.training.feature_store import FeatureStore
from mindone_lumina.training.sources import read_items

BUCKETS = buckets(16, (1.0, 2.0), 8)  # 16x16 and 8x24 (H x W)
TOKENS = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    data = root / "data"
    data.mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i in range(12):  # 8 square, 4 wide: whole batches of 2 (and of 2 ranks x 2) in both buckets
        size = (12, 24) if i % 3 == 0 else (16, 16)
        Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(data / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a {'red blue green'.split()[i % 3]} shape {'x' * (i % 5)}"})
    (data / "broken.png").write_bytes(b"not a png")
    words = root / "vocabulary.jsonl"  # the tiny encoder's tokenizer learns these captions' words
    words.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows[5:5] = [{"image": "broken.png", "caption": "broken"}, {"image": "1.png"}]
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoder = root / "text_encoder"
    args = ["--captions", str(words), "--out", str(encoder), "--hidden", "32", "--layers", "2"]
    load_tool("make_text_encoder").main(args + ["--heads", "2", "--vocab", "300"])
    model = components.load_text_encoder(str(encoder))
    tokenizer = components.load_tokenizer(str(encoder), model.cfg)
    items = read_items(str(data))
    meta = store_meta(items, str(encoder), None, BUCKETS, TOKENS)
    extract(items, str(root / "store"), meta, tokenizer, model, None, BUCKETS, TOKENS, batch=3, shard_bytes=6000,
            log=lambda m: None)  # fmt: skip
    return items, FeatureStore(str(root / "store")), tokenizer, model, root


CFG = TrainConfig(data="d", output="o", batch_size=2, caption_dropout=0.5, seed=3)


def collect(samples, cfg, first, last, rank=0, world=1, workers=0):
    return list(loader.batches(samples, cfg, first, last, rank, world, workers))


def test_cached_batches_follow_the_plan_whatever_the_workers(setup):
    items, store, *_ = setup
    samples = loader.CachedSamples(store, TOKENS)
    assert samples.size == 12 and samples.skipped == {"missing caption": 1, "unreadable": 1}
    assert [len(g) for g in samples.groups] == [4, 8]  # sorted latent shapes: (3, 8, 24) before (3, 16, 16)
    epoch = collect(samples, CFG, 0, 6)  # 2 + 4 batches of 2
    assert sorted(i for batch in epoch for i in batch[5]) == list(range(12))  # every sample once
    for got, want in zip(collect(samples, CFG, 0, 6, workers=2), epoch):  # worker processes: the same batches
        for a, b in zip(got, want):
            assert np.array_equal(a, b)
    assert all(
        np.array_equal(a, b) for got, want in zip(collect(samples, CFG, 4, 6), epoch[4:]) for a, b in zip(got, want)
    )
    empty = store.shared("empty_caption")["cap_feats"]
    dropped = 0
    for x1, x0, _, feats, mask, idx, bad in epoch:
        assert x1.shape == x0.shape and feats.shape == (2, samples.cap_length, 32) and bad == 0
        for row, i in enumerate(idx):
            sample = store[int(i)]
            np.testing.assert_array_equal(x1[row], sample["latent"])
            n = int(mask[row].sum())
            if n == len(empty) and np.array_equal(feats[row, :n], empty):
                dropped += 1
            else:
                np.testing.assert_array_equal(feats[row, :n], sample["cap_feats"])
            assert not feats[row, n:].any()
    assert 0 < dropped < 12  # caption dropout 0.5
    ranks = [collect(samples, CFG, 0, 3, rank, 2) for rank in (0, 1)]  # global batch 4: 1 + 2 batches an epoch
    seen = [i for r in ranks for batch in r for i in batch[5]]
    assert sorted(seen) == list(range(12))  # each sample on one rank, once


def test_online_samples_read_what_the_store_holds(setup, tmp_path):
    items, store, tokenizer, model, root = setup
    cached = loader.CachedSamples(store, TOKENS)
    codes = loader.scan(items, BUCKETS, str(tmp_path / "cache"))
    assert np.array_equal(loader.scan(items, BUCKETS, str(tmp_path / "cache")), codes)  # kept for a resumed run
    online = loader.OnlineSamples(items, codes, BUCKETS, tokenizer, model, None, TOKENS)
    assert online.skipped == cached.skipped and online.size == cached.size
    assert all(np.array_equal(a, b) for a, b in zip(online.groups, cached.groups))
    cfg = dataclasses.replace(CFG, caption_dropout=0.3)
    for got, want in zip(collect(online, cfg, 0, 6, workers=2), collect(cached, cfg, 0, 6)):
        assert np.array_equal(got[5], want[5]) and np.array_equal(got[0], want[0])  # samples, pixels
        n = want[4].shape[1]
        assert np.array_equal(got[4][:, :n], want[4]) and not got[4][:, n:].any()
        np.testing.assert_allclose(got[3][:, :n], want[3], atol=1e-5)  # Gemma per batch vs per extraction batch

    moved = [dataclasses.replace(item, image=str(tmp_path / f"{n}.png")) if item.image else item
             for n, item in enumerate(items)]  # fmt: skip
    for item, copy in zip(items, moved):
        if item.image:
            shutil.copy(item.image, copy.image)
    online = loader.OnlineSamples(moved, loader.scan(moved, BUCKETS), BUCKETS, tokenizer, model, None, TOKENS)
    x1, *_, idx, bad = collect(online, cfg, 0, 1)[0]
    with open(online.images[idx[0]], "wb") as f:  # broken after the scan
        f.write(b"truncated")
    again = collect(online, cfg, 0, 1)[0]
    assert again[-1] == 1 and np.array_equal(again[0][0], x1[1])  # replaced by the other image of its batch
