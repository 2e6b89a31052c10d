"""Feature extraction: exactly once under concurrency, and a killed or damaged write is never served."""

import os
import signal
import subprocess
import sys
import uuid

import numpy as np
import ray

from trials.coordinator import get_coordinator
from trials.features import BackboneSpec, DatasetSpec, ExtractJob, feature_key, read_features, run_extract_job
from trials.store import FeatureStore

BACKBONE = BackboneSpec("adm-28-small", None, "random:0")
DIGITS = DatasetSpec("digits", limits=(("train", 400),))


def key(block, t=10, split="train"):
    return feature_key(BACKBONE, DIGITS, split, t, block, 0, 16)


def test_eight_concurrent_requests_cause_one_extraction(ray_local, tmp_path):
    coordinator = get_coordinator(f"test-{uuid.uuid4().hex[:6]}", str(tmp_path), {"num_cpus": 1})
    refs = [coordinator.ensure.remote(BACKBONE, DIGITS, "train", 10, (4, 8), 0, 16, False, 4096, 128)
            for _ in range(8)]
    results = ray.get(refs)
    assert ray.get(coordinator.launch_counts.remote()) == {"digits/train/t10/0/random:0": 1}
    # one request launched the extraction and reports the two keys it wrote; the seven others waited
    # for it and found nothing left to do
    assert sorted(len(r) for r in results) == [0] * 7 + [2]
    store = FeatureStore(str(tmp_path))
    assert len(read_features(store, BACKBONE, DIGITS, "train", 10, 4, 0, 16)) == 400
    # once stored, another request launches nothing
    assert ray.get(coordinator.ensure.remote(BACKBONE, DIGITS, "train", 10, (4, 8), 0, 16)) == []
    assert ray.get(coordinator.launch_counts.remote())["digits/train/t10/0/random:0"] == 1


def test_same_features_whatever_the_batching(tmp_path):
    a = run_extract_job(ExtractJob(BACKBONE, DIGITS, "train", 10, (4,), 0, batch_size=64, store_root=str(tmp_path / "a")))
    b = run_extract_job(ExtractJob(BACKBONE, DIGITS, "train", 10, (4,), 0, batch_size=400, store_root=str(tmp_path / "b")))
    fa = FeatureStore(str(tmp_path / "a")).read(key(4)).take(np.arange(400)).astype(np.float32)
    fb = FeatureStore(str(tmp_path / "b")).read(key(4)).take(np.arange(400)).astype(np.float32)
    assert a.images == b.images == 400
    assert np.abs(fa - fb).max() <= 2e-3 * max(1.0, np.abs(fa).max())  # seeded noise: same ε per image


SLOW_EXTRACT = """
import sys, torch
torch.set_num_threads(1)
from trials.features import BackboneSpec, DatasetSpec, ExtractJob, run_extract_job
job = ExtractJob(BackboneSpec("adm-28-small", None, "random:0"), DatasetSpec("digits", limits=(("train", 400),)),
                 "train", 10, (4, 8), 0, batch_size=8, store_root=sys.argv[1])
print("started", flush=True)
run_extract_job(job, on_batch=lambda n: print("batch", flush=True))
"""


def test_killed_extraction_is_never_served_and_is_recomputed(ray_local, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXTRACT, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    for _ in range(5):  # let it get well into the work, then kill it hard
        assert proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = FeatureStore(str(tmp_path))
    assert not store.has(key(4)) and not store.has(key(8))
    coordinator = get_coordinator(f"test-{uuid.uuid4().hex[:6]}", str(tmp_path), {"num_cpus": 1})
    ray.get(coordinator.ensure.remote(BACKBONE, DIGITS, "train", 10, (4, 8), 0, 16, True, 4096, 128))
    assert len(store.read(key(8))) == 400


def test_truncated_file_is_detected_and_recomputed(ray_local, tmp_path):
    run_extract_job(ExtractJob(BACKBONE, DIGITS, "train", 10, (4,), 0, batch_size=200, store_root=str(tmp_path)))
    store = FeatureStore(str(tmp_path))
    good = store.read(key(4)).take(np.arange(400)).copy()
    path = store.part_path(key(4), 0, 1)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])
    coordinator = get_coordinator(f"test-{uuid.uuid4().hex[:6]}", str(tmp_path), {"num_cpus": 1})
    ray.get(coordinator.ensure.remote(BACKBONE, DIGITS, "train", 10, (4,), 0, 16, True, 4096, 200))
    assert np.array_equal(store.read(key(4)).take(np.arange(400)), good)
