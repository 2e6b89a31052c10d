"""Train/val/test as a sweep uses them: official val where published, else carved from train."""

from __future__ import annotations

import numpy as np

from trials.datasets.base import DatasetError, DatasetSplits, Sample


def _stratified_pick(samples: list[Sample], count, seed: int) -> np.ndarray:
    """Per class, a seeded shuffle of its members and the first `count(n_members)` of them."""
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in samples])
    picked: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        picked.extend(members[:count(len(members))].tolist())
    return np.array(sorted(picked), dtype=int)


def carve_val(train: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified by class, deterministic for a seed; every class keeps at least one train image."""
    is_val = np.zeros(len(train), dtype=bool)
    is_val[_stratified_pick(train, lambda n: min(int(round(fraction * n)), n - 1), seed)] = True
    return [s for s, v in zip(train, is_val) if not v], [s for s, v in zip(train, is_val) if v]


def subsample(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """A seeded, class-stratified subset of at most `limit` samples (order kept)."""
    if limit is None or len(samples) <= limit:
        return samples
    keep = _stratified_pick(samples, lambda n: max(1, round(limit * n / len(samples))), seed)
    return [samples[i] for i in keep[:limit]]


def sweep_splits(data: DatasetSplits, val_fraction: float, seed: int,
                 limits: dict[str, int | None] | None = None) -> dict[str, list[Sample]]:
    """{"train", "val", "test"} for a sweep. Test is only ever the official test split."""
    if "test" in data.splits:
        test = data.splits["test"]
        if "val" in data.splits:
            train, val = data.splits["train"], data.splits["val"]
        else:
            train, val = carve_val(data.splits["train"], val_fraction, seed)
    else:  # ImageNet-style folders publish train + val only: val is the held-out (test) set
        test = data.splits["val"]
        train, val = carve_val(data.splits["train"], val_fraction, seed)
    out = {"train": train, "val": val, "test": test}
    limits = limits or {}
    for split, limit in limits.items():
        present = len({s.label for s in out.get(split, [])})
        if limit is not None and limit < present:
            # a stratified subset smaller than the class count would drop whole classes
            raise DatasetError(f"{data.name}: limit.{split} = {limit} is below its {present} classes; set "
                               f"limit.{split} to at least {present} (or leave it out)")
    return {k: subsample(v, limits.get(k), seed) for k, v in out.items()}


def sweep_split_sizes(published: dict[str, int], val_fraction: float,
                      limits: dict[str, int | None] | None = None) -> dict[str, int]:
    """What `sweep_splits` makes of a dataset with these official split sizes, in image counts
    (val carved as a whole rather than per class: within a few images of the real carve)."""
    train, test = published["train"], published.get("test", published.get("val"))
    if "test" in published and "val" in published:
        val = published["val"]
    else:
        val = min(int(round(val_fraction * train)), train - 1)
        train -= val
    limits = limits or {}
    return {k: min(n, limits.get(k) or n) for k, n in {"train": train, "val": val, "test": test}.items()}
