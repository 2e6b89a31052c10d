"""From images to stored features: the backbone, the dataset split, and sharded extraction.

`extract_batch` is the one function that turns pixels into features; the store, `predict` and
`evaluate` all go through it, so a feature is the same number wherever it is computed.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from trials.datasets import Sample, load_dataset
from trials.datasets.preprocess import iter_batches
from trials.datasets.splits import sweep_splits
from trials.diffusion import q_sample, seeded_noise
from trials.extract import DeviceCapture, to_device
from trials.store import CorruptFeatureFile, FeatureArray, FeatureKey, FeatureStore, files_digest
from trials.unet import UNetModel, create_unet, load_checkpoint, make_config


@dataclass(frozen=True)
class BackboneSpec:
    """Which frozen U-Net: an architecture, its weights (None = random, seeded) and noise schedule."""

    arch: str | tuple  # architecture name, or sorted (flag, value) pairs
    checkpoint: str | None
    sha256: str
    schedule: str = "linear"

    @property
    def flags(self) -> dict[str, Any]:
        return make_config(self.arch if isinstance(self.arch, str) else dict(self.arch)).to_flags()


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: str | None = None
    val_fraction: float = 0.1
    limits: tuple = ()  # (("train", 3000), ...) seeded stratified subsets, for quick sweeps
    skip_corrupt: bool = False
    options: tuple = ()  # loader options, e.g. (("level", "family"),)
    seed: int = 0


@functools.lru_cache(maxsize=4)
def load_backbone(spec: BackboneSpec, device: str = "cpu") -> UNetModel:
    arch = spec.arch if isinstance(spec.arch, str) else dict(spec.arch)
    if spec.checkpoint is None:  # the random-weights baseline: seeded, without touching the global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(spec.sha256.split(":")[-1]) if spec.sha256.startswith("random:") else 0)
            model = create_unet(arch)
    else:
        model = load_checkpoint(spec.checkpoint, arch)
    return model.to(device).eval().requires_grad_(False)  # DeviceCapture sets the CUDA memory format


@functools.lru_cache(maxsize=8)
def dataset_splits(spec: DatasetSpec) -> tuple[list[str], dict[str, list[Sample]]]:
    data = load_dataset(spec.name, spec.root, **dict(spec.options))
    return data.classes, sweep_splits(data, spec.val_fraction, spec.seed, dict(spec.limits))


def preprocessing(model_flags: dict[str, Any]) -> dict[str, Any]:
    return {"image_size": model_flags["image_size"], "channels": model_flags["in_channels"],
            "resize": "shorter-side bicubic + center crop", "range": "[-1, 1]"}


def feature_key(backbone: BackboneSpec, dataset: DatasetSpec, split: str, t: int, block: int,
                noise_seed: int, max_spatial: int) -> FeatureKey:
    _, splits = dataset_splits(dataset)
    samples = splits[split]
    flags = backbone.flags
    return FeatureKey(
        checkpoint_sha256=backbone.sha256, model_config=json.dumps(flags, sort_keys=True), dataset=dataset.name,
        split=split, files_digest=files_digest([s.image_id for s in samples], [s.label for s in samples]),
        preprocessing=json.dumps(preprocessing(flags), sort_keys=True), t=int(t), noise_seed=int(noise_seed),
        block=int(block), max_spatial=int(max_spatial))


@torch.no_grad()
def extract_batch(model: UNetModel, x: torch.Tensor, image_ids: list[str], t: int, blocks: list[int],
                  noise_seed: int, max_spatial: int, schedule: str = "linear",
                  y: torch.Tensor | None = None) -> dict[int, np.ndarray]:
    """Noise `x` (pixels in [-1, 1]) to step t with per-image seeded ε, capture blocks, pool to at
    most max_spatial², and round to fp16 as stored."""
    device = next(model.parameters()).device
    x = to_device(x, device)
    noise = seeded_noise(tuple(x.shape[1:]), noise_seed, image_ids, t, device=device)
    xt = q_sample(x, t, noise, schedule)
    maps = DeviceCapture(model, blocks, pool=max_spatial)(xt, t, y=y)  # the CUDA fast path when on a GPU
    return {b: m.numpy() for b, m in maps.items()}


@dataclass(frozen=True)
class ExtractJob:
    """One shard of one (dataset, split, t) group: a U-Net pass per batch, all `blocks` captured."""

    backbone: BackboneSpec
    dataset: DatasetSpec
    split: str
    t: int
    blocks: tuple[int, ...]
    noise_seed: int
    max_spatial: int = 16
    batch_size: int = 256
    start: int = 0
    stop: int | None = None
    part: int = 0
    num_parts: int = 1
    store_root: str = "features"

    @property
    def group(self) -> str:
        return f"{self.dataset.name}/{self.split}/t{self.t}"


@dataclass
class ExtractStats:
    images: int = 0
    seconds: float = 0.0
    passes: int = 0  # image passes through the U-Net
    keys: list[str] = field(default_factory=list)


def shard_jobs(backbone: BackboneSpec, dataset: DatasetSpec, split: str, t: int, blocks: tuple[int, ...],
               noise_seed: int, store_root: str, max_spatial: int = 16, shard_size: int = 4096,
               batch_size: int = 256) -> list[ExtractJob]:
    """Split a group into image-range shards; each writes part i of n for every block's key."""
    _, splits = dataset_splits(dataset)
    n = len(splits[split])
    num_parts = max(1, -(-n // shard_size))
    return [ExtractJob(backbone, dataset, split, int(t), tuple(sorted(blocks)), noise_seed, max_spatial, batch_size,
                       i * shard_size, min(n, (i + 1) * shard_size), i, num_parts, store_root)
            for i in range(num_parts)]


def missing_blocks(job_like: ExtractJob, store: FeatureStore, verify: bool = False) -> list[int]:
    """The blocks of `job_like`'s group whose keys are not in `store` (with `verify`, damaged ones are
    deleted and count as missing)."""
    missing = []
    for b in job_like.blocks:
        key = feature_key(job_like.backbone, job_like.dataset, job_like.split, job_like.t, b,
                          job_like.noise_seed, job_like.max_spatial)
        if not store.has(key):
            missing.append(b)
        elif verify:
            try:
                store.read(key, verify=True)
            except CorruptFeatureFile:
                store.delete(key)
                missing.append(b)
    return missing


def run_extract_job(job: ExtractJob, device: str | None = None,
                    on_batch: Callable[[int], None] | None = None) -> ExtractStats:
    """Compute one shard and write its parts. Idempotent: the parts are content-addressed."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_backbone(job.backbone, device)
    flags = job.backbone.flags
    _, splits = dataset_splits(job.dataset)
    samples = splits[job.split][job.start:job.stop]
    store = FeatureStore(job.store_root)
    per_block: dict[int, list[np.ndarray]] = {b: [] for b in job.blocks}
    labels, ids = [], []
    stats = ExtractStats()
    t0 = time.perf_counter()
    for x, batch in iter_batches(samples, flags["image_size"], flags["in_channels"], job.batch_size,
                                 skip_corrupt=job.dataset.skip_corrupt):
        batch_ids = [s.image_id for s in batch]
        maps = extract_batch(model, torch.from_numpy(x), batch_ids, job.t, list(job.blocks), job.noise_seed,
                             job.max_spatial, job.backbone.schedule)
        for b in job.blocks:
            per_block[b].append(maps[b])
        labels.extend(s.label for s in batch)
        ids.extend(batch_ids)
        stats.images += len(batch)
        stats.passes += len(batch)
        if on_batch:
            on_batch(len(batch))
    provenance = {"checkpoint": job.backbone.checkpoint, "arch": job.backbone.arch, "t": job.t,
                  "shard": [job.start, job.stop], "created": time.time()}
    for b in job.blocks:
        key = feature_key(job.backbone, job.dataset, job.split, job.t, b, job.noise_seed, job.max_spatial)
        store.write_part(key, np.concatenate(per_block[b]), np.array(labels), ids, job.part, job.num_parts,
                         provenance)
        stats.keys.append(key.stem)
    stats.seconds = time.perf_counter() - t0
    return stats


def read_features(store: FeatureStore, backbone: BackboneSpec, dataset: DatasetSpec, split: str, t: int,
                  block: int, noise_seed: int, max_spatial: int) -> FeatureArray:
    return store.read(feature_key(backbone, dataset, split, t, block, noise_seed, max_spatial))
