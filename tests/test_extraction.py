"""Feature extraction: exactly once under concurrency, streamed in bounded parts, a killed or damaged
write is never served, and a trial that finds a feature missing never deadlocks the cluster."""

import os
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest
import ray

from trials.coordinator import ensure_in_trial, get_coordinator, read_pooled
from trials.features import (BackboneSpec, DatasetSpec, FeatureRequest, FillOptions, fill_part, fill_request,
                             plan_parts)
from trials.requests import with_block_table
from trials.store import FeatureStore

# as a sweep makes it: carrying its block table (the coordinator plans parts with it, without torch)
BACKBONE = with_block_table(BackboneSpec("adm-28-small", None, "random:0"))
DIGITS = DatasetSpec("digits", limits=(("train", 400),))


def request(blocks=(4, 8), t=10, split="train"):
    return FeatureRequest(BACKBONE, DIGITS, split, (t,), tuple(blocks))


def key(block, t=10, split="train"):
    return request((block,), t, split).key(t, block)


def coordinator():
    return get_coordinator(f"test-{uuid.uuid4().hex[:6]}", {"num_cpus": 1})


def test_eight_concurrent_requests_cause_one_extraction(ray_local, tmp_path):
    c = coordinator()
    options = FillOptions(str(tmp_path), batch_size=128)
    results = ray.get([c.fill.remote(request(), options) for _ in range(8)])
    group = request().group
    assert ray.get(c.launch_counts.remote()) == {group: 1}
    # one request launched the extraction and reports the two keys it wrote; the seven others waited
    # for it and found nothing left to do
    assert sorted(len(r) for r in results) == [0] * 7 + [2]
    store = FeatureStore(str(tmp_path))
    assert len(store.read(key(4))) == 400
    # once stored, another request launches nothing
    assert ray.get(c.fill.remote(request(), options)) == []
    assert ray.get(c.launch_counts.remote())[group] == 1
    # the coordinator planned and launched all that without torch in its own process: a sweep's
    # actor costs an interpreter with Ray, not one with torch
    pid = ray._private.state.actors(c._actor_id.hex())["Pid"]  # (Ray's public state API needs the dashboard)
    assert "libtorch" not in open(f"/proc/{pid}/maps").read()


def test_same_features_whatever_the_batching_and_parts(tmp_path):
    a = fill_request(request((4,)), FillOptions(str(tmp_path / "a"), batch_size=64))
    # a part bound of 20 images' maps: several parts, streamed batch by batch
    small = FillOptions(str(tmp_path / "b"), batch_size=16, part_bytes=20 * 64 * 14 * 14 * 2)
    assert len(plan_parts(request((4,)), small)) == 400 // 16  # 16 images (one batch) per part
    b = fill_request(request((4,)), small)
    fa = FeatureStore(str(tmp_path / "a")).read(key(4)).take(np.arange(400)).astype(np.float32)
    fb_array = FeatureStore(str(tmp_path / "b")).read(key(4))
    fb = fb_array.take(np.arange(400)).astype(np.float32)
    assert a.images == b.images == 400 and len(fb_array.parts) == 25
    assert np.abs(fa - fb).max() <= 2e-3 * max(1.0, np.abs(fa).max())  # seeded noise: same ε per image


def test_part_bytes_bound_every_file(tmp_path):
    options = FillOptions(str(tmp_path), batch_size=32, part_bytes=100 * 1024)
    fill_request(request((4, 8)), options)
    store = FeatureStore(str(tmp_path))
    for b in (4, 8):
        paths = store._part_paths(key(b))
        shape = store.read(key(b)).shape
        assert len(paths) > 1
        for p in paths:  # map bytes of a part stay within the bound (the file adds Arrow's framing)
            rows = len(FeatureStore(str(tmp_path))._read_part(p, False)[1])
            assert rows * int(np.prod(shape[1:])) * 2 <= options.part_bytes


SLOW_EXTRACT = """
import sys, torch
torch.set_num_threads(1)
from trials.features import BackboneSpec, DatasetSpec, FeatureRequest, FillOptions, fill_request
request = FeatureRequest(BackboneSpec("adm-28-small", None, "random:0"), DatasetSpec("digits", limits=(("train", 400),)),
                         "train", (10,), (4, 8))
print("started", flush=True)
fill_request(request, FillOptions(sys.argv[1], batch_size=8), on_batch=lambda n: print("batch", flush=True))
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
    ray.get(coordinator().fill.remote(request(), FillOptions(str(tmp_path), batch_size=128)))
    assert len(store.read(key(8))) == 400


def test_truncated_file_is_detected_and_recomputed(ray_local, tmp_path):
    options = FillOptions(str(tmp_path), batch_size=200)
    fill_request(request((4,)), options)
    store = FeatureStore(str(tmp_path))
    good = store.read(key(4)).take(np.arange(400)).copy()
    path = store.part_path(key(4), 0, 1)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])
    ensure_in_trial(coordinator(), request((4,)), options, "cpu")
    assert np.array_equal(store.read(key(4)).take(np.arange(400)), good)


def test_failed_part_leaves_nothing_behind(tmp_path):
    options = FillOptions(str(tmp_path), batch_size=100)
    bad = DatasetSpec("digits", limits=(("train", 400),))
    job = plan_parts(FeatureRequest(BACKBONE, bad, "train", (10,), (4,), numeric="cuda-bf16"), options)[0]
    try:
        fill_part(job, device="cpu")  # a CPU cannot compute cuda-bf16 features: refused before writing
    except RuntimeError as e:
        assert "cuda-bf16" in str(e)
    else:
        raise AssertionError("fill_part computed features of another numeric path")
    assert not any(p.suffix == ".tmp" or p.suffix == ".arrow" for p in tmp_path.rglob("*"))


@ray.remote
def _trial_that_holds_a_gpu(c, req, options) -> str:
    # a trial holding the cluster's only (logical) GPU finds its feature missing
    ensure_in_trial(c, req, options, "cpu")
    return "done"


def test_missing_feature_inside_gpu_trials_does_not_deadlock(ray_local, tmp_path):
    """Both (logical) GPUs are held by trials waiting for the same missing feature; the extraction
    must not wait for a GPU. One trial computes it in its own process, the other waits for it."""
    options = FillOptions(str(tmp_path), batch_size=128)
    c = get_coordinator(f"test-{uuid.uuid4().hex[:6]}", {"num_cpus": 1, "num_gpus": 1})
    fill_request(request((4,)), options)
    FeatureStore(str(tmp_path)).delete(key(4))  # deleted behind the sweep's back
    assert ray.cluster_resources().get("GPU") == 2  # tests/conftest.py's logical GPUs
    trials = [_trial_that_holds_a_gpu.options(num_gpus=1).remote(c, request((4,)), options) for _ in range(2)]
    assert ray.get(trials, timeout=300) == ["done", "done"]
    assert ray.get(c.launch_counts.remote()) == {request((4,)).group: 1}  # computed once
    assert len(FeatureStore(str(tmp_path)).read(key(4))) == 400


def test_pooled_cache_is_built_once_and_equals_pooling_the_map(ray_local, tmp_path):
    import torch
    import torch.nn.functional as F

    options = FillOptions(str(tmp_path), batch_size=128)
    fill_request(request((4,)), options)
    store = FeatureStore(str(tmp_path))
    c = coordinator()
    pooled = [read_pooled(c, store, request((4,)), 10, 4, 2, (1, 2, 4)) for _ in range(3)]
    assert ray.get(c.launch_counts.remote()) == {key(4).pooled(2).stem: 1}
    full = store.read(key(4)).take(np.arange(400))
    want = F.adaptive_avg_pool2d(torch.from_numpy(full).float(), 2).numpy()
    assert pooled[0].shape == (400, 64, 2, 2) and pooled[0].dtype == np.float32
    assert np.array_equal(pooled[0].take(np.arange(400)), want)
    assert store.has(key(4).pooled(1)) and store.has(key(4).pooled(4))  # one pass made every pool


def test_numeric_path_is_part_of_the_key_and_a_worker_refuses_another_path(tmp_path):
    """GPU fills (bf16 autocast, cuDNN autotune) and CPU fills (fp32) give different numbers, so
    they have different keys; a CPU worker never writes features under the GPU path's key."""
    from dataclasses import replace

    cpu = request(blocks=(4,))
    gpu = replace(cpu, numeric="cuda-bf16")
    assert cpu.key(10, 4).numeric == "cpu-fp32" and gpu.key(10, 4).numeric == "cuda-bf16"
    assert cpu.key(10, 4).digest != gpu.key(10, 4).digest and cpu.group != gpu.group
    with pytest.raises(RuntimeError, match="cuda-bf16"):
        fill_request(gpu, FillOptions(str(tmp_path)), device="cpu")
    assert not FeatureStore(str(tmp_path)).has(gpu.key(10, 4))


def test_auto_numeric_path_is_bf16_on_cpus_with_bf16_units_only(tmp_path):
    """`store.numeric: auto` on CPUs: bf16 autocast where the CPU has native bf16 dot products
    (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo's flags), fp32 elsewhere (emulated bf16 is slower)."""
    from orchestrator.config import SweepConfig
    from orchestrator.sweep import sweep_numeric
    from trials.features import cpu_has_bf16_units, numeric_path

    def cpuinfo(flags: str) -> str:
        path = tmp_path / f"cpuinfo-{len(flags)}"
        path.write_text(f"processor\t: 0\nvendor_id\t: X\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        return str(path)

    assert cpu_has_bf16_units(cpuinfo("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni"))  # AMD Zen 4, Cooper Lake
    assert cpu_has_bf16_units(cpuinfo("fpu avx512f amx_bf16 amx_tile"))  # Sapphire Rapids and later
    assert not cpu_has_bf16_units(cpuinfo("fpu sse2 avx2 avx512f avx512bw avx512_vnni"))  # AVX-512 without bf16
    assert not cpu_has_bf16_units(str(tmp_path / "absent"))
    here = "cpu-bf16" if cpu_has_bf16_units() else "cpu-fp32"
    assert numeric_path("cpu") == here
    assert numeric_path("cuda") == "cuda-bf16"
    spec = {"name": "n", "datasets": [{"name": "digits"}], "space": {"t": [10], "block": [4], "head": {"linear": {}}}}
    assert sweep_numeric(SweepConfig.model_validate(spec)) == here
    assert sweep_numeric(SweepConfig.model_validate({**spec, "store": {"numeric": "cpu-fp32"}})) == "cpu-fp32"
    assert sweep_numeric(SweepConfig.model_validate({**spec, "resources": {"extract_gpu": 1}})) == "cuda-bf16"


def test_cpu_bf16_features_have_their_own_key_are_close_to_fp32_and_match_the_predict_path(tmp_path):
    """`store.numeric: cpu-bf16`: bf16 autocast on a CPU is another arithmetic, so another key; its maps
    stay close to fp32's (cosine per image), and predict / evaluate (`extract_batch` with the export's
    numeric) compute the same numbers as the fill."""
    from dataclasses import replace

    import torch

    from trials.datasets.preprocess import iter_batches
    from trials.features import extract_batch, load_backbone

    fp32 = request(blocks=(8,))
    bf16 = replace(fp32, numeric="cpu-bf16")
    assert bf16.key(10, 8).digest != fp32.key(10, 8).digest and bf16.group != fp32.group
    for r in (fp32, bf16):
        fill_request(r, FillOptions(str(tmp_path), batch_size=64), device="cpu")
    store = FeatureStore(str(tmp_path))
    a = store.read(fp32.key(10, 8)).take(np.arange(64)).astype(np.float32).reshape(64, -1)
    b = store.read(bf16.key(10, 8)).take(np.arange(64)).astype(np.float32).reshape(64, -1)
    assert not np.array_equal(a, b)  # bf16 arithmetic really ran
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999, cos.min()
    x, batch = next(iter_batches(bf16.samples()[:64], 28, 1, 64))
    direct = extract_batch(load_backbone(BACKBONE), torch.from_numpy(x), [s.image_id for s in batch], 10, [8], 0, 16,
                           numeric="cpu-bf16")[8].astype(np.float32).reshape(64, -1)
    assert np.abs(direct - b).max() <= np.abs(a - b).max() / 4  # the bf16 path, not fp32's


def test_noise_ensemble_is_one_batched_pass_and_matches_the_predict_path(tmp_path):
    """A k-draw feature: its own key, the mean over k seeded ε (draw 0 is the one-draw feature's ε),
    the same numbers from the store fill and from `extract_batch` (predict / evaluate)."""
    import torch

    from trials.datasets.preprocess import iter_batches
    from trials.diffusion import seeded_noise, seeded_noise_batch
    from trials.features import extract_batch, load_backbone

    ids = ["a", "b", "c"]
    noise = seeded_noise_batch((1, 4, 4), 0, ids, (10, 200), draws=2)
    assert noise.shape == (2, 6, 1, 4, 4)
    assert torch.equal(noise[1, :3], seeded_noise_batch((1, 4, 4), 0, ids, (200,))[0])  # draw 0 = today's ε
    assert torch.equal(noise[0, 1], seeded_noise((1, 4, 4), 0, ["b"], 10)[0])
    assert not torch.equal(noise[0, 3:], noise[0, :3])  # draw 1 is new noise

    two = FeatureRequest(BACKBONE, DIGITS, "train", (10,), (4,), noise_draws=2)
    assert two.key(10, 4) != key(4) and two.group != request((4,)).group
    fill_request(two, FillOptions(str(tmp_path), batch_size=64))
    fill_request(request((4,)), FillOptions(str(tmp_path), batch_size=64))
    store = FeatureStore(str(tmp_path))
    k2 = store.read(two.key(10, 4)).take(np.arange(40)).astype(np.float32)
    k1 = store.read(key(4)).take(np.arange(40)).astype(np.float32)
    assert not np.allclose(k1, k2)
    samples = two.samples()[:40]
    x, batch = next(iter_batches(samples, 28, 1, 40))
    model = load_backbone(BACKBONE)
    direct = extract_batch(model, torch.from_numpy(x), [s.image_id for s in batch], 10, [4], 0, 16, draws=2)[4]
    np.testing.assert_allclose(direct.astype(np.float32), k2, atol=2e-3)
    one = extract_batch(model, torch.from_numpy(x), [s.image_id for s in batch], 10, [4], 0, 16)[4]
    np.testing.assert_allclose(one.astype(np.float32), k1, atol=2e-3)


def test_one_cached_extractor_per_arithmetic():
    """The benchmark asks for the device's default (bf16=None), the fill for its path (bf16=False on a
    CPU fp32 path): the same extractor, so a compile is paid once; bf16 is another one."""
    from trials.extract import cached_capture
    from trials.features import load_backbone

    model = load_backbone(BACKBONE)
    assert cached_capture(model, [8], pool=16) is cached_capture(model, [8], pool=16, bf16=False)
    assert cached_capture(model, [8], pool=16, bf16=True) is not cached_capture(model, [8], pool=16)
