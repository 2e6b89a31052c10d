"""Helpers shared by the benchmarks: run from a checkout, pick the backbone and dataset, fill a store.

Every benchmark prints a ratio against a baseline measured in the same run (machines are noisy), and
ends with one `key=value ...` line that tests/test_benchmarks.py checks the format of.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

SHIPPED = ROOT / "trials" / "checkpoints" / "adm-28-small-fashion_mnist.safetensors"


def set_threads(n: int) -> None:
    """Same intra-op thread count for the baseline and the measured path (fair ratios)."""
    import torch
    torch.set_num_threads(max(1, n))


def backbone(arch: str = "adm-28-small", checkpoint: str | None = None, random_weights: bool = False):
    """A BackboneSpec: `checkpoint` None = the shipped small DDPM (as `checkpoint.path: null` does)."""
    from trials.ddpm import sha256_file
    from trials.features import BackboneSpec

    if random_weights:
        return BackboneSpec(arch, None, "random:0")
    path = Path(checkpoint) if checkpoint else SHIPPED
    if not path.is_file():
        raise SystemExit(f"checkpoint {path} not found; pass --checkpoint PATH")
    return BackboneSpec(arch, str(path), sha256_file(path))


def dataset(name: str = "digits", limit: int | None = None, val_limit: int | None = None, val_fraction: float = 0.15,
            seed: int = 0):
    """A DatasetSpec; `limit` takes a seeded stratified subset of the train split (and val_limit of val)."""
    from trials.features import DatasetSpec

    limits = tuple(sorted((k, v) for k, v in (("train", limit), ("val", val_limit)) if v is not None))
    return DatasetSpec(name, None, val_fraction, limits, False, (), seed)


def request(backbone_spec, dataset_spec, split: str, ts, blocks, max_spatial: int = 16, noise_seed: int = 0,
            numeric: str | None = None):
    """A FeatureRequest computed in this process (its numeric path: this machine's default, or `numeric`)."""
    import torch

    from trials.features import FeatureRequest, numeric_path

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return FeatureRequest(backbone_spec, dataset_spec, split, tuple(ts), tuple(blocks), noise_seed, max_spatial,
                          numeric or numeric_path(device))


def fill_store(backbone_spec, dataset_spec, ts, blocks, store_root: str, splits=("train", "val"),
               batch_size: int = 128, max_spatial: int = 16, noise_seed: int = 0) -> tuple[int, float]:
    """diffsweep's way (the store fill itself): one U-Net pass per (split, t) capturing every block.
    Returns (image passes, seconds)."""
    from trials.features import FillOptions, fill_request

    passes, t0 = 0, time.perf_counter()
    options = FillOptions(store_root, batch_size=batch_size)
    for split in splits:
        passes += fill_request(request(backbone_spec, dataset_spec, split, ts, blocks, max_spatial, noise_seed),
                               options).passes
    return passes, time.perf_counter() - t0
