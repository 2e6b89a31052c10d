"""scikit-learn's bundled 8×8 digits (1,797 images, shipped inside the package; no download)."""

from __future__ import annotations

import numpy as np

from trials.datasets.base import DatasetSplits, Sample

TEST_FRACTION = 0.25  # digits has no published split; a fixed, seeded, stratified quarter is test


def load(root=None) -> DatasetSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
    idx = np.arange(len(images))
    train_idx, test_idx = train_test_split(idx, test_size=TEST_FRACTION, stratify=bunch.target, random_state=0)
    out = DatasetSplits("digits", [str(d) for d in range(10)])
    for split, ids in (("train", sorted(train_idx)), ("test", sorted(test_idx))):
        out.splits[split] = [Sample(f"digits-{i}", images[i], int(bunch.target[i])) for i in ids]
    return out
