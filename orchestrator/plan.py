"""`diffsweep plan`: what a sweep will cost before anything runs.

Think in bytes per image × images × maps: per dataset the images per split; U-Net image passes; the
feature bytes of every (t, block) map and in total; the pooled caches of the pooled heads; the
trials' checkpoint bytes; the trial and head-epoch bounds; extraction time from a per-image cost
measured here (`--measure N`) or given (`--throughput`); the peak RAM of one extraction task. The
same arithmetic sizes the store's parts and the `memory=` that extraction tasks declare to Ray.
"""

from __future__ import annotations

import itertools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import ConfigError, Range, SweepConfig
from trials.head_registry import REGISTRY

SPLITS_FILLED = ("train", "val")  # extracted before the trials; test only for each dataset's winner
ROW_OVERHEAD = 8  # bytes per stored row besides the map: int32 label + int32 string offset
BATCH_OVERHEAD = 600  # Arrow IPC framing + checksum metadata per record batch
FILE_OVERHEAD = 3000  # schema (with the key as JSON) + footer per part file


def _gib(n: float) -> str:
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class KeyCost:
    dataset: str
    split: str
    t: int
    block: int
    images: int
    bytes: int
    stored: bool
    draws: int = 1  # noise-ensemble size (space.noise_draws): its own key

    @property
    def label(self) -> str:
        return f"t{self.t}/b{self.block}" + (f"/k{self.draws}" if self.draws != 1 else "")


def stored_bytes(images: int, map_bytes: int, id_bytes: int, batch_size: int, parts: int) -> int:
    """Bytes one key takes in the store: the fp16 maps plus Arrow's per-row, per-batch and per-file
    overheads (the image ids are counted exactly)."""
    batches = sum(-(-n // batch_size) for n in _part_sizes(images, parts))
    return images * (map_bytes + ROW_OVERHEAD) + id_bytes + batches * BATCH_OVERHEAD + parts * FILE_OVERHEAD


def _part_sizes(images: int, parts: int) -> list[int]:
    per = -(-images // max(parts, 1))
    return [min(per, images - i * per) for i in range(parts)] if images else [0]


def _head_checkpoint_bytes(cfg: SweepConfig, head: str, shapes: list[tuple[int, int, int]], num_classes: int,
                           maps: list[tuple[int, int]] | None = None) -> int:
    """Largest checkpoint one trial of `head` writes: weights + optimiser state (+ BN buffers), fp32.
    `maps`: the (t, block) of each shape, for heads that are told them."""
    import torch

    from trials.heads import build_head_for_maps
    from trials.train_head import split_hparams

    params = cfg.space.head[head]
    listed = {k: v for k, v in params.items() if not isinstance(v, Range)}
    combos = list(itertools.islice(itertools.product(*listed.values()), 256)) or [()]
    state_per_param = 2 if cfg.training.recipe == "paper" else 3  # SGD momentum / AdamW's two moments
    best = 0
    for values in combos:
        kw, _ = split_hparams(dict(zip(listed, values)))
        if REGISTRY[head].pooled:
            kw["pool"] = max(cfg.space.pool)
        if REGISTRY[head].takes_maps:
            kw["maps"] = [list(m) for m in maps or ()]
        with torch.device("meta"):
            model = build_head_for_maps(head, shapes, num_classes, **kw)
        n = sum(p.numel() for p in model.parameters())
        buffers = sum(b.numel() for b in model.buffers())
        best = max(best, 4 * (n * state_per_param + buffers))
    return best


def measure_throughput(setup, n: int) -> float:
    """Images/s of the real extraction (`extract_batch`, the store fill's compute) on this machine,
    at the deepest block the space reads, in the sweep's numeric path, timed over `n` images after
    one warm-up batch."""
    import numpy as np
    import torch

    from trials.features import class_labels, extract_batch, load_backbone

    flags = setup.backbone.flags
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_backbone(setup.backbone, device)
    blocks = sorted({b for bs in setup.space_blocks.values() for b in bs})
    batch = max(1, min(n, 16))
    x = torch.from_numpy(np.zeros((batch, flags["in_channels"], flags["image_size"], flags["image_size"]), np.float32))
    ids = [str(i) for i in range(batch)]
    y = class_labels(setup.backbone, batch, device)
    extract_batch(model, x, ids, 10, blocks, 0, setup.max_spatial, y=y, numeric=setup.numeric)  # warm-up
    done, t0 = 0, time.perf_counter()
    while done < n:
        extract_batch(model, x, ids, 10, blocks, 0, setup.max_spatial, y=y, numeric=setup.numeric)
        done += batch
    return done / (time.perf_counter() - t0)


ESTIMATED_ID_BYTES = 48  # bytes of one image id (its relative path) when the dataset is not on this machine


@dataclass(frozen=True)
class SplitSize:
    images: int
    id_bytes: int
    estimated: bool  # from the published archive's sizes, not from the files


def dataset_sizes(spec, published: bool) -> tuple[int, dict[str, SplitSize]]:
    """(classes, per split sizes) of one dataset as the sweep will use it. With `published`, a
    dataset whose files are not here is sized from its archive's published split sizes."""
    from trials.datasets import DatasetError, published_sizes
    from trials.datasets.splits import sweep_split_sizes
    from trials.features import dataset_splits

    try:
        classes, splits = dataset_splits(spec)
    except DatasetError:
        sizes = published_sizes(spec.name) if published else None
        if sizes is None:
            raise
        counts = sweep_split_sizes(sizes[1], spec.val_fraction, dict(spec.limits))
        return sizes[0], {s: SplitSize(n, n * ESTIMATED_ID_BYTES, True) for s, n in counts.items()}
    return len(classes), {s: SplitSize(len(v), sum(len(x.image_id.encode()) for x in v), False)
                          for s, v in splits.items()}


def sweep_plan(cfg: SweepConfig, setup=None, measure: int = 0, throughput: float | None = None,
               published: bool = False) -> dict[str, Any]:
    from orchestrator.search import PerDatasetOptunaSearch
    from orchestrator.sweep import trial_setup
    from trials.features import extraction_memory_bytes, plan_parts
    from trials.pooled import pooled_side
    from trials.store import FeatureStore

    setup = setup or trial_setup(cfg)
    store = FeatureStore(setup.store_root)
    pooled_heads = [h for h in cfg.space.head if REGISTRY[h].pooled]
    datasets, keys, pooled_bytes, ckpt_bytes = {}, [], 0, 0
    peak_task, passes, test_passes = 0, 0, 0
    ts = sorted(setup.space_blocks)
    for name, spec in setup.datasets.items():
        num_classes, sizes = dataset_sizes(spec, published)
        estimated = any(z.estimated for z in sizes.values())
        datasets[name] = {"classes": num_classes, "images": {s: z.images for s, z in sizes.items()},
                          "sizes": "published" if estimated else "files"}
        for split in ("train", "val", "test"):
            size = sizes[split]
            for t, k in itertools.product(ts, setup.space_draws):
                request = setup.request(name, split, t, draws=k)
                shapes = request.shapes()
                parts = plan_parts(request, setup.fill, images=size.images)
                peak_task = max(peak_task, extraction_memory_bytes(request, setup.fill.batch_size))
                for b, shape in shapes.items():
                    nbytes = stored_bytes(size.images, shape.bytes_per_image, size.id_bytes, setup.fill.batch_size,
                                          len(parts))
                    stored = not size.estimated and store.has(request.key(t, b))
                    keys.append(KeyCost(name, split, t, b, size.images, nbytes, stored, k))
                    if split in SPLITS_FILLED and pooled_heads and b in cfg.space.block:
                        sides = {pooled_side(p, shape.side) for p in cfg.space.pool}
                        pooled_bytes += sum(size.images * shape.channels * s * s * 4 for s in sides)
            if split in SPLITS_FILLED:  # a k-draw feature costs k image passes
                passes += size.images * sum(setup.space_draws)
            if split == "test":
                test_passes += size.images * max(setup.space_draws)  # the winner's t (and k) only
        shapes0 = setup.request(name, "train", ts[0]).shapes()
        for head in cfg.space.head:
            first = cfg.space.map_sets(head)[:1]  # the first map set stands for all (sets are usually alike in size)
            if first:
                maps = []
                for t, b in first[0]:
                    s = setup.request(name, "train", t).shapes()[b]
                    maps.append((s.channels, s.side, s.side))
            else:
                widest = max(shapes0.values(), key=lambda s: s.channels * s.side ** 2)
                maps = [(widest.channels, widest.side, widest.side)]
            ckpt_bytes = max(ckpt_bytes, _head_checkpoint_bytes(cfg, head, maps, num_classes,
                                                                 first[0] if first else None))
    trials = PerDatasetOptunaSearch(cfg).total_budget
    fill_bytes = sum(k.bytes for k in keys if k.split in SPLITS_FILLED)
    test_bytes = sum(max((sum(k.bytes for k in keys if k.dataset == d and k.split == "test" and k.t == t
                              and k.draws == draws) for t in ts for draws in setup.space_draws), default=0)
                     for d in setup.datasets)
    missing = sum(k.bytes for k in keys if k.split in SPLITS_FILLED and not k.stored)
    per_map = {}
    for k in keys:
        if k.split in SPLITS_FILLED:
            per_map[k.label] = per_map.get(k.label, 0) + k.bytes
    blocks = {}
    for b, s in setup.request(next(iter(setup.datasets)), "train", ts[0]).shapes().items():
        blocks[str(b)] = {"channels": s.channels, "native": s.native, "stored": s.side,
                          "bytes_per_image": s.bytes_per_image, "pooled_by_store": s.side < s.native}
    if measure:
        throughput = measure_throughput(setup, measure)
    image_passes = passes * len(ts)
    plan = {
        "name": cfg.name, "datasets": datasets, "blocks": blocks,
        "image_passes": image_passes, "test_image_passes_max": test_passes,
        "feature_bytes": {"per_map": per_map, "fill": fill_bytes, "test_max": test_bytes,
                          "total": fill_bytes + test_bytes, "missing": missing},
        "pooled_cache_bytes": pooled_bytes,
        "checkpoint_bytes": {"per_trial_max": ckpt_bytes * cfg.training.checkpoints_to_keep,
                             "total_max": ckpt_bytes * cfg.training.checkpoints_to_keep * trials},
        "trials": trials, "head_epochs_max": trials * cfg.epochs,
        "extract_task_peak_ram_bytes": peak_task,
        "throughput_img_s": throughput,
        "extract_seconds": (image_passes / throughput) if throughput else None,
        "store": setup.store_root, "store_free_bytes": free_bytes(setup.store_root),
    }
    return plan


def free_bytes(path: str) -> int | None:
    """Free bytes on the filesystem that holds `path` (None for remote URIs)."""
    if "://" in path:
        return None
    folder = Path(path)
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    return shutil.disk_usage(existing).free if existing else None


def check_space(plan: dict[str, Any]) -> None:
    """Refuse, in one line with the numbers, a sweep whose features do not fit the store's disk."""
    need = plan["feature_bytes"]["missing"] + plan["feature_bytes"]["test_max"] + plan["pooled_cache_bytes"]
    free = plan["store_free_bytes"]
    if free is not None and need > free:
        raise ConfigError(f"store.path: {plan['store']} has {_gib(free)} free, the sweep needs {_gib(need)} of "
                          "features and pooled caches (`diffsweep plan` has the breakdown); free space or point "
                          "store.path at a larger filesystem")


def format_plan(plan: dict[str, Any]) -> str:
    lines = [f"plan for sweep '{plan['name']}':"]
    for name, d in plan["datasets"].items():
        imgs = ", ".join(f"{s} {n}" for s, n in d["images"].items())
        note = " (published sizes: files not on this machine)" if d["sizes"] == "published" else ""
        lines.append(f"  {name:<16} {d['classes']:>5} classes; images: {imgs}{note}")
    for b, info in plan["blocks"].items():
        note = f" (pooled to {info['stored']}x{info['stored']} by store.max_spatial)" if info["pooled_by_store"] else ""
        lines.append(f"  block {b:>3}: {info['channels']} ch at {info['native']}x{info['native']}{note}, "
                     f"{_gib(info['bytes_per_image'])} per image")
    fb = plan["feature_bytes"]
    lines.append(f"  U-Net image passes: {plan['image_passes']} (train+val) + at most "
                 f"{plan['test_image_passes_max']} (test, winners only)")
    lines.append(f"  features: {_gib(fb['fill'])} train+val over {len(fb['per_map'])} (t, block) maps + at most "
                 f"{_gib(fb['test_max'])} test = {_gib(fb['total'])}; not yet stored: {_gib(fb['missing'])}")
    pooled_heads = ", ".join(name for name, spec in REGISTRY.items() if spec.pooled)
    lines.append(f"  pooled caches ({pooled_heads}): {_gib(plan['pooled_cache_bytes'])}")
    cb = plan["checkpoint_bytes"]
    lines.append(f"  trials: {plan['trials']}, at most {plan['head_epochs_max']} head-epochs; checkpoints at most "
                 f"{_gib(cb['per_trial_max'])} per trial, {_gib(cb['total_max'])} in all")
    lines.append(f"  extraction task peak RAM: {_gib(plan['extract_task_peak_ram_bytes'])}")
    if plan["extract_seconds"] is not None:
        lines.append(f"  extraction: {plan['extract_seconds'] / 60:.1f} min at {plan['throughput_img_s']:.1f} img/s")
    free = plan["store_free_bytes"]
    lines.append(f"  store {plan['store']}: " + (f"{_gib(free)} free" if free is not None else "remote"))
    return "\n".join(lines)
