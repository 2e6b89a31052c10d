"""scikit-learn's bundled 8×8 digits (1,797 images, shipped inside the package; no download).

The pixels are read from the CSV that `sklearn.datasets.load_digits` reads, without importing
scikit-learn: its import costs about 1.1 CPU-seconds, paid by every process that opens the dataset
(the driver, the feature coordinator, each extraction task and trial). Digits has no published
split; ours is pinned in digits_split.json (made once by scikit-learn's seeded, stratified
`train_test_split`, a quarter for test), so it does not move with scikit-learn's version either.
tests/test_datasets_digits.py checks both against scikit-learn itself.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from trials.datasets.base import DatasetSplits, Sample

SPLIT_FILE = Path(__file__).with_name("digits_split.json")
TEST_FRACTION = 0.25  # the share digits_split.json holds out for test


def bundled_csv() -> Path:
    """sklearn/datasets/data/digits.csv.gz, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    return Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"


def load(root=None) -> DatasetSplits:
    data = np.loadtxt(bundled_csv(), delimiter=",")  # 64 pixels (0..16) then the label, per row
    images = (data[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
    target = data[:, -1].astype(int)
    test = set(json.loads(SPLIT_FILE.read_text())["test"])
    out = DatasetSplits("digits", [str(d) for d in range(10)])
    samples = [Sample(f"digits-{i}", image, int(label)) for i, (image, label) in enumerate(zip(images, target))]
    out.splits["train"] = [s for i, s in enumerate(samples) if i not in test]
    out.splits["test"] = [samples[i] for i in sorted(test)]
    return out
