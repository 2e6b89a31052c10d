"""From images to stored features: the backbone, the dataset split, and streaming extraction.

`extract_batch` is the one function that turns pixels into features; the store, `predict` and
`evaluate` all go through it, so a feature is the same number wherever it is computed.

`FeatureRequest` names "these maps of this dataset split" and `plan_parts` cuts it into byte-bounded
parts (both in `trials/requests.py`); `fill_part` is the one store-fill loop (the sweep's Ray tasks,
a trial that finds a feature missing, `diffsweep cka` and the benchmarks all run it). A part streams
to the store one image batch at a time, so a worker's memory does not grow with the dataset.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from trials.datasets.preprocess import iter_batches, prefetch
from trials.diffusion import q_sample, seeded_noise_batch
from trials.extract import cached_capture, to_device
# the request types are plain Python in trials/requests.py (the coordinator needs no torch); callers
# may import them from here too
from trials.requests import (BackboneSpec, DatasetSpec, ExtractStats, FeatureRequest,  # noqa: F401
                             FillOptions, PartJob, dataset_splits, extraction_memory_bytes, plan_parts,
                             preprocessing)
from trials.store import FeatureArray, FeatureStore
from trials.unet import UNetModel, create_unet, load_checkpoint


@functools.lru_cache(maxsize=4)
def load_backbone(spec: BackboneSpec, device: str = "cpu") -> UNetModel:
    if spec.checkpoint is None:  # the random-weights baseline: seeded, without touching the global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(spec.sha256.split(":")[-1]) if spec.sha256.startswith("random:") else 0)
            model = create_unet(spec.arch_config)
    else:
        model = load_checkpoint(spec.checkpoint, spec.arch_config)
    return model.to(device).eval().requires_grad_(False)  # DeviceCapture sets the CUDA memory format



# CPU flags of native bf16 dot products (Linux /proc/cpuinfo names): where oneDNN's bf16 convolutions
# beat fp32. Without them bf16 autocast is emulated and slower than fp32.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(BF16_CPU_FLAGS & set(line.partition(":")[2].split()))
    except OSError:
        pass
    return False


def numeric_path(device: str | torch.device) -> str:
    """The arithmetic features are computed with on `device` by default: bf16 autocast with cuDNN
    autotune on CUDA; on a CPU bf16 autocast where it has bf16 units (AVX512-BF16, AMX), else fp32.
    It is part of every feature key: the paths do not give the same numbers."""
    if torch.device(device).type == "cuda":
        return "cuda-bf16"
    return "cpu-bf16" if cpu_has_bf16_units() else "cpu-fp32"


def computes(numeric: str, device: str | torch.device) -> bool:
    """Whether a worker on `device` computes features of this numeric path (a CPU: either CPU path)."""
    return numeric.split("-")[0] == torch.device(device).type


def uses_bf16(numeric: str) -> bool:
    return numeric.endswith("-bf16")


def class_labels(spec: BackboneSpec, n: int, device) -> torch.Tensor | str | None:
    """The `y` a class-conditional U-Net is run with: a fixed id for every image, or "mean"."""
    if spec.class_label is None or spec.class_label == "mean":
        return spec.class_label
    return torch.full((n,), int(spec.class_label), dtype=torch.long, device=device)



@torch.no_grad()
def extract_batch(model: UNetModel, x: torch.Tensor, image_ids: list[str], t: int, blocks: list[int],
                  noise_seed: int, max_spatial: int, schedule: str = "linear",
                  y: torch.Tensor | str | None = None, draws: int = 1,
                  numeric: str | None = None) -> dict[int, np.ndarray]:
    """Noise `x` (pixels in [-1, 1]) to step t with per-image seeded ε, capture blocks, pool to at
    most max_spatial², and round to fp16 as stored; with `draws` > 1, the mean over that many ε.
    `numeric`: the features' path (a sweep's `store.numeric`); on a CPU, cpu-bf16 runs bf16 autocast,
    anything else fp32; CUDA always runs its bf16 fast path."""
    device = next(model.parameters()).device
    noise = seeded_noise_batch(tuple(x.shape[1:]), noise_seed, image_ids, (t,), pin_memory=device.type == "cuda",
                               draws=draws)
    bf16 = device.type == "cuda" or uses_bf16(numeric or "")
    capture = cached_capture(model, blocks, pool=max_spatial, bf16=bf16)  # the CUDA fast path when on a GPU
    if torch.is_tensor(y) and draws > 1:
        y = y.repeat(draws)
    maps = capture(noised_rows(to_device(x, device), to_device(noise, device), (t,), schedule), t, y=y)
    return {b: mean_over_draws(m, draws).numpy() for b, m in maps.items()}


def mean_over_draws(maps: torch.Tensor, draws: int) -> torch.Tensor:
    """(draws·N, ...) fp16 maps, draw-major, -> their (N, ...) mean in fp16 (summed in fp32).
    Each draw's map is already rounded to fp16, so the mean differs from an fp32 mean by at most
    about one fp16 rounding."""
    if draws == 1:
        return maps
    return maps.view(draws, maps.shape[0] // draws, *maps.shape[1:]).float().mean(0).to(maps.dtype)


def noised_rows(x: torch.Tensor, noise: torch.Tensor, ts: tuple[int, ...], schedule: str = "linear") -> torch.Tensor:
    """x_t of every image at every step of `ts`, t-major: rows [k·R, (k+1)·R) are step ts[k].
    `noise` is (len(ts), R, ...) as `seeded_noise_batch` makes it, R = draws·N (draw-major), so
    each image is repeated once per draw."""
    k, rows = len(ts), noise.shape[1]
    t_rows = torch.tensor(ts, dtype=torch.long).repeat_interleave(rows)
    reps = k * (rows // x.shape[0])
    return q_sample(x.repeat(reps, *([1] * (x.dim() - 1))), t_rows, noise.reshape(k * rows, *x.shape[1:]), schedule)



class _StageClock:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        with self._lock:
            self.seconds[stage] += now - since
        return now


def _decode_threads() -> int:
    return max(4, min(16, os.cpu_count() or 4))


def t_groups(ts: tuple[int, ...], images: int, rows: int) -> list[tuple[int, ...]]:
    """Steps of `ts` that share one forward: as many as fit in `rows` rows for a batch of `images`
    (several t of a small batch in one pass; one t per pass once the batch alone fills `rows`)."""
    per = max(1, min(len(ts), rows // max(1, images)))
    return [tuple(ts[i:i + per]) for i in range(0, len(ts), per)]


def fill_part(job: PartJob, device: str | None = None, on_batch: Callable[[int], None] | None = None) -> ExtractStats:
    """Compute one part of every key of the request and stream it to the store.

    Idempotent (parts are content-addressed) and atomic (each file is renamed into place only when
    complete). Three stages overlap: a prefetch thread decodes and resizes batch i+1 and draws its
    seeded noise for every t; this thread runs the forward of batch i (several t of a small batch in
    one pass; pooling and the fp16 cast on the device) with the process's cached, optionally
    compiled, extractor; a writer thread writes batch i-1. At most a few batches are held."""
    request = job.request
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not computes(request.numeric, device):
        raise RuntimeError(f"request for {request.numeric} features, but this worker computes "
                           f"{numeric_path(device)} on {device}")
    cuda = torch.device(device).type == "cuda"
    model = load_backbone(request.backbone, device)
    flags = request.backbone.flags
    samples = request.samples()[job.start:job.stop]
    store = FeatureStore(job.options.store_root)
    shapes = request.shapes()
    rows = job.options.batch_size
    compile_ = cuda if job.options.compile is None else job.options.compile
    capture = cached_capture(model, request.blocks, pool=request.max_spatial, compile=compile_, rows=rows,
                             bf16=uses_bf16(request.numeric))
    provenance = {"checkpoint": request.backbone.checkpoint, "arch": request.backbone.arch,
                  "class_label": request.backbone.class_label, "shard": [job.start, job.stop], "created": time.time()}
    writers = {(t, b): store.part_writer(request.key(t, b), job.part, job.num_parts,
                                         (shapes[b].channels, shapes[b].side, shapes[b].side), {**provenance, "t": t})
               for t, b in request.maps()}
    clock = _StageClock()
    image_shape = (flags["in_channels"], flags["image_size"], flags["image_size"])

    draws = request.noise_draws
    images_per_batch = max(1, job.options.batch_size // draws)  # a batch's draws·N rows fit one forward

    def decoded():
        since = time.perf_counter()
        for x, batch in iter_batches(samples, flags["image_size"], flags["in_channels"], images_per_batch,
                                     workers=_decode_threads(), skip_corrupt=request.dataset.skip_corrupt):
            x = torch.from_numpy(x)
            x = x.pin_memory() if cuda else x
            since = clock.add("decode", since)
            yield x, batch
            since = time.perf_counter()

    def with_noise(item):
        x, batch = item
        since = time.perf_counter()
        ids = [s.image_id for s in batch]
        noise = seeded_noise_batch(image_shape, request.noise_seed, ids, request.ts, pin_memory=cuda,
                                   workers=2 if cuda else 1, draws=draws)
        clock.add("noise", since)
        return x, batch, noise

    stats = ExtractStats()
    t0 = time.perf_counter()
    pending = None
    try:
        with ThreadPoolExecutor(max_workers=1) as writer_thread:
            batches = prefetch(decoded(), depth=2, prepare=with_noise)
            try:
                since = time.perf_counter()
                for x, batch, noise in batches:
                    since = clock.add("wait", since)
                    ids, labels = [s.image_id for s in batch], [s.label for s in batch]
                    n = len(batch)
                    x_dev, noise_dev = to_device(x, model_device(model)), to_device(noise, model_device(model))
                    submitted = []
                    for k0, group in _offsets(t_groups(request.ts, n * draws, rows)):
                        xt = noised_rows(x_dev, noise_dev[k0:k0 + len(group)], group, request.backbone.schedule)
                        t_rows = torch.tensor(group, dtype=torch.long).repeat_interleave(n * draws)
                        y = class_labels(request.backbone, n * draws * len(group), device)
                        submitted.append((group, capture.submit(xt, t_rows, y=y)))
                    since = clock.add("forward", since)
                    if pending is not None:
                        pending.result()
                    since = clock.add("wait", since)
                    pending = writer_thread.submit(_write_batch, writers, submitted, n, labels, ids, clock, draws)
                    stats.images += n
                    stats.passes += n * draws * len(request.ts)
                    if on_batch:
                        on_batch(n)
                    since = time.perf_counter()
            finally:
                batches.close()
            if pending is not None:
                pending.result()
        for (t, b), w in writers.items():
            w.close()
            stats.keys.append(request.key(t, b).stem)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    stats.seconds = time.perf_counter() - t0
    stats.stages = dict(clock.seconds)
    return stats


def model_device(model: UNetModel) -> torch.device:
    return next(model.parameters()).device


def _offsets(groups: list[tuple[int, ...]]) -> list[tuple[int, tuple[int, ...]]]:
    out, k = [], 0
    for g in groups:
        out.append((k, g))
        k += len(g)
    return out


def _write_batch(writers: dict, submitted: list, n: int, labels: list[int], ids: list[str], clock: _StageClock,
                 draws: int = 1) -> None:
    since = time.perf_counter()
    maps = {}
    rows = n * draws
    for group, captured in submitted:  # waits for the device (CUDA: the async copy back)
        got = captured.result()
        for k, t in enumerate(group):
            maps[t] = {b: mean_over_draws(m[k * rows:(k + 1) * rows], draws).numpy() for b, m in got.items()}
    since = clock.add("device_wait", since)
    for (t, b), w in writers.items():
        w.write(maps[t][b], labels, ids)
    clock.add("write", since)


def fill_request(request: FeatureRequest, options: FillOptions, verify: bool = False, device: str | None = None,
                 on_batch: Callable[[int], None] | None = None) -> ExtractStats:
    """Fill what `request` lacks in this process, part after part (no Ray): the loop every
    in-process caller shares."""
    total = ExtractStats()
    for sub in request.missing(FeatureStore(options.store_root), verify):
        for job in plan_parts(sub, options):
            stats = fill_part(job, device, on_batch)
            total.images += stats.images
            total.passes += stats.passes
            total.seconds += stats.seconds
            total.keys.extend(stats.keys)
            for stage, sec in stats.stages.items():
                total.stages[stage] = total.stages.get(stage, 0.0) + sec
    return total


def read_map(store: FeatureStore, request: FeatureRequest, t: int, block: int, verify: bool = True) -> FeatureArray:
    return store.read(request.key(t, block), verify=verify)
