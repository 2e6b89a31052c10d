"""Pooled features in memory for benchmarks/search_efficiency.py: fill the store once, pool once, split.

For one dataset: the feature store is filled once (common.fill_store: one U-Net pass per (split, t),
every block captured), the pooled caches are built once per (t, block) with the sweep's own
trials.pooled.build_pooled, and every (t, block, pool) matrix is held in memory as float32. The
sweep's train split is cut, by a seeded class-stratified pick, into the rows heads train on and a
judge split no search ever sees; the sweep's val split is what searches choose on. The official
test split is never read.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

import common  # noqa: F401  (puts the checkout on sys.path)


@dataclass(frozen=True)
class Splits:
    """One (t, block, pool) matrix as three in-memory FeatureArrays."""

    train: object
    val: object
    judge: object


@dataclass(frozen=True)
class Data:
    name: str
    num_classes: int
    maps: dict  # (t, block, pool) -> Splits
    sizes: dict  # split -> images
    passes: int
    seconds: float


def judge_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded, class-stratified boolean mask: True = judge row (carved from the sweep's train)."""
    rng = np.random.default_rng([seed, 7919])
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        mask[members[:int(round(fraction * len(members)))]] = True
    return mask


def in_memory(array, rows: np.ndarray):
    from trials.store import FeatureArray

    x = np.ascontiguousarray(array.take(rows), dtype=np.float32)
    return FeatureArray([x], np.asarray(array.labels)[rows], [array.image_ids[i] for i in rows])


def load(name: str, *, random_weights: bool, checkpoint: str | None, ts, blocks, pools, store_root: str,
         train_limit: int | None, val_limit: int | None, val_fraction: float, judge_fraction: float,
         seed: int = 0) -> Data:
    from trials.features import dataset_splits
    from trials.pooled import build_pooled, pooled_side
    from trials.store import FeatureStore

    t0 = time.perf_counter()
    backbone = common.backbone(checkpoint=checkpoint, random_weights=random_weights)
    spec = common.dataset(name, train_limit, val_limit, val_fraction)
    passes, _ = common.fill_store(backbone, spec, ts, blocks, store_root, batch_size=128)
    store = FeatureStore(store_root)
    maps, judge_mask = {}, None
    for t, block in itertools.product(ts, blocks):
        keys = {s: common.request(backbone, spec, s, [t], [block]).key(t, block) for s in ("train", "val")}
        arrays = {}
        for split, key in keys.items():
            side = store.read(key).shape[-1]
            build_pooled(store, key, list(pools))
            arrays[split] = {p: store.read(key.pooled(pooled_side(p, side))) for p in pools}
        if judge_mask is None:
            judge_mask = judge_rows(np.asarray(arrays["train"][pools[0]].labels), judge_fraction, seed)
            image_ids = arrays["train"][pools[0]].image_ids
        assert arrays["train"][pools[0]].image_ids == image_ids, "train rows differ between keys"
        for p in pools:
            tr, va = arrays["train"][p], arrays["val"][p]
            maps[(t, block, p)] = Splits(in_memory(tr, np.flatnonzero(~judge_mask)),
                                         in_memory(va, np.arange(len(va))),
                                         in_memory(tr, np.flatnonzero(judge_mask)))
    first = next(iter(maps.values()))
    sizes = {"train": len(first.train), "val": len(first.val), "judge": len(first.judge)}
    classes = len(dataset_splits(spec)[0])
    return Data(name, classes, maps, sizes, passes, time.perf_counter() - t0)
