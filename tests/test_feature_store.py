"""The sharded feature store (issue #27): bounded shards, the reader's order and shapes, resume after a kill, parts
written in parallel, and clear errors for a store made with other settings or missing a shard."""

import os

import numpy as np
import pytest

from mindone_lumina.training.feature_store import FeatureStore, ShardWriter

META = {"vae": "abc", "buckets": [(32, 32)], "tokens": 16}  # tuples: stored as JSON lists, still equal on resume


def sample(i: int) -> dict:
    rng = np.random.default_rng(i)
    h = 8 if i % 2 else 4  # two buckets
    return {"latent": rng.standard_normal((4, h, 8)).astype(np.float32),
            "cap_feats": rng.standard_normal((3 + i % 5, 6)).astype(np.float32)}  # fmt: skip


def test_shards_are_bounded_and_read_back_in_id_order(tmp_path):
    bound = 2 * sample(0)["latent"].nbytes  # about two samples per shard
    with ShardWriter(str(tmp_path), "r0", META, max_shard_bytes=bound) as w:
        for i in (5, 0, 12, 3, 7, 1, 9):
            w.add(str(i), sample(i))
            w.commit()
        w.skip("2", "unreadable")
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(shards) >= 3 and all(os.path.getsize(tmp_path / f) < 3 * bound for f in shards)
    store = FeatureStore(str(tmp_path))
    assert store.ids == ["0", "1", "3", "5", "7", "9", "12"] and store.meta["buckets"] == [[32, 32]]
    assert store.skipped == {"unreadable": 1}
    for n, i in enumerate(int(i) for i in store.ids):
        got = store[n]
        assert store.shapes(n) == {k: v.shape for k, v in sample(i).items()}
        for name, want in sample(i).items():
            np.testing.assert_array_equal(got[name], want)


def test_a_killed_writer_resumes_after_its_last_shard(tmp_path):
    bound = 2 * sample(0)["latent"].nbytes
    w = ShardWriter(str(tmp_path), "r0", META, max_shard_bytes=bound)
    w.skip("bad", "unreadable")  # saved with the first shard
    for i in range(5):
        w.add(str(i), sample(i))
        w.commit()
    # killed here: no close; samples 0-3 are in two complete shards, 4 only in memory; a temporary is left over
    (tmp_path / ".r0-00002.safetensors.x1y2.safetensors").write_bytes(b"half")
    assert FeatureStore(str(tmp_path)).ids == ["0", "1", "2", "3"]
    with ShardWriter(str(tmp_path), "r0", META, max_shard_bytes=bound) as again:
        assert again.done == {"0", "1", "2", "3", "bad"}
        for i in [*range(6), "bad"]:
            if str(i) in again.done:
                continue
            again.add(str(i), sample(i))  # the extraction would retry "bad" and count it twice without done
            again.commit()
        with pytest.raises(ValueError, match="'2' is already in part r0"):
            again.add("2", sample(2))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    store = FeatureStore(str(tmp_path))
    assert store.ids == [str(i) for i in range(6)] and store.skipped == {"unreadable": 1}
    np.testing.assert_array_equal(store[4]["latent"], sample(4)["latent"])


def test_parts_written_in_parallel_read_as_one_store(tmp_path):
    for rank in range(2):
        with ShardWriter(str(tmp_path), f"r{rank}", META) as w:
            for i in range(rank, 10, 2):
                w.add(str(i), sample(i))
            w.commit()
            w.skip(f"x{rank}", "missing caption")
    store = FeatureStore(str(tmp_path))
    assert store.ids == [str(i) for i in range(10)] and store.skipped == {"missing caption": 2}


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="has no index"):
        FeatureStore(str(tmp_path))
    with ShardWriter(str(tmp_path), "r0", META) as w:
        w.add("0", sample(0))
    with pytest.raises(ValueError, match=r"other settings: \['tokens'\] differ"):
        ShardWriter(str(tmp_path), "r1", META | {"tokens": 32})
    with pytest.raises(ValueError, match="part must be"):
        ShardWriter(str(tmp_path), "r/1", META)
    with pytest.raises(ValueError, match="sample ids"):
        ShardWriter(str(tmp_path), "r1", META).add("a/b", sample(0))
    os.remove(tmp_path / "r0-00000.safetensors")
    with pytest.raises(ValueError, match="lists r0-00000.safetensors, which is missing"):
        FeatureStore(str(tmp_path))
