"""Dataset registry: name -> loader module. Each module has `load(root, **options) -> DatasetSplits`."""

from __future__ import annotations

import importlib
from pathlib import Path

from trials.datasets.base import DatasetError, DatasetSplits, Sample

# name -> module under trials.datasets (imported on first use)
REGISTRY = {
    "cub": "cub",
    "flowers102": "flowers102",
    "aircraft": "aircraft",
    "stanford_cars": "stanford_cars",
    "stanford_dogs": "stanford_dogs",
    "nabirds": "nabirds",
    "imagefolder": "imagefolder",
    "fashion_mnist": "fashion_mnist",
    "digits": "digits",
}


def load_dataset(name: str, root: str | Path | None = None, **options) -> DatasetSplits:
    if name not in REGISTRY:
        raise DatasetError(f"unknown dataset '{name}'; known: {', '.join(REGISTRY)}")
    module = importlib.import_module(f"trials.datasets.{REGISTRY[name]}")
    return module.load(root, **options)


def published_sizes(name: str) -> tuple[int, dict[str, int]] | None:
    """(classes, {split: images}) of the dataset's published archive, for planning a sweep before
    the data is on this machine; None for datasets without a fixed published size."""
    if name not in REGISTRY:
        raise DatasetError(f"unknown dataset '{name}'; known: {', '.join(REGISTRY)}")
    return getattr(importlib.import_module(f"trials.datasets.{REGISTRY[name]}"), "PUBLISHED", None)


__all__ = ["REGISTRY", "published_sizes", "DatasetError", "DatasetSplits", "Sample", "load_dataset"]
