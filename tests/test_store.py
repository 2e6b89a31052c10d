"""FeatureStore: round trip, zero-copy reads, atomic parts, corruption detection."""

import numpy as np
import pytest

from trials.store import CorruptFeatureFile, FeatureKey, FeatureStore


def key(block=3, t=10):
    return FeatureKey("sha", "{}", "digits", "train", "files", "{}", t, 0, block, 16)


def test_round_trip_is_zero_copy(tmp_path):
    store = FeatureStore(str(tmp_path))
    x = np.random.default_rng(0).normal(size=(20, 4, 3, 3)).astype(np.float16)
    store.write(key(), x, np.arange(20), [f"id{i}" for i in range(20)], provenance={"t": 10})
    got = store.read(key())
    assert np.array_equal(got.take(np.arange(20)), x)
    assert got.parts[0].flags["OWNDATA"] is False  # a view on the memory map, not a copy
    assert got.labels.tolist() == list(range(20)) and got.image_ids[3] == "id3"
    assert '"t": 10' in got.metadata["diffsweep.key"] and got.metadata["diffsweep.t"] == "10"


def test_parts_are_served_only_when_all_exist(tmp_path):
    store = FeatureStore(str(tmp_path))
    x = np.ones((10, 2, 2, 2), np.float16)
    store.write_part(key(), x[:5], np.zeros(5), list("abcde"), part=0, num_parts=2)
    assert not store.has(key())  # half of a sharded write is never served
    with pytest.raises(KeyError):
        store.read(key())
    store.write_part(key(), x[5:] * 2, np.ones(5), list("fghij"), part=1, num_parts=2)
    got = store.read(key())
    assert len(got) == 10 and got.take(np.array([0, 7])).tolist() == [x[0].tolist(), (x[7] * 2).tolist()]


def test_temporary_files_are_never_served(tmp_path):
    store = FeatureStore(str(tmp_path))
    path = store.part_path(key(), 0, 1)
    (tmp_path / "digits" / "train").mkdir(parents=True)
    open(path + ".abc.tmp", "wb").write(b"half a file")
    assert not store.has(key())


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_file_is_detected(tmp_path, damage):
    store = FeatureStore(str(tmp_path))
    x = np.random.default_rng(1).normal(size=(50, 8, 4, 4)).astype(np.float16)
    path = store.write(key(), x, np.arange(50), [str(i) for i in range(50)])
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # one flipped byte inside the feature buffer: only the checksum can see it
        data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptFeatureFile):
        store.read(key())


def test_keys_are_content_addressed():
    assert key(3).digest != key(4).digest and key(3).digest == key(3).digest
    assert key(t=10).stem.startswith("digits/train/t10_b3_")


def test_noise_draws_change_the_key_and_one_draw_keeps_the_old_one():
    from dataclasses import replace
    one = key()
    # digests a store written before noise ensembles holds (computed with that version's FeatureKey)
    assert one.digest == "a564d3af9b13733cc23b" and one.pooled(2).digest == "d1e6c36fd9b0dead3619"
    assert one.stem == "digits/train/t10_b3_a564d3af9b13733cc23b"
    four = replace(one, noise_draws=4)
    assert four.digest != one.digest and four.pooled(2).digest != one.pooled(2).digest
    assert four.stem.startswith("digits/train/t10_b3_k4_") and four.pooled(2).noise_draws == 4
