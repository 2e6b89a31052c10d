"""Digits read without scikit-learn are scikit-learn's digits, in scikit-learn's split."""

import subprocess
import sys

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tests.conftest import ROOT
from trials.datasets.digits import TEST_FRACTION, load


def test_pixels_labels_and_split_are_scikit_learns():
    bunch = load_digits()
    _, test_idx = train_test_split(np.arange(len(bunch.images)), test_size=TEST_FRACTION, stratify=bunch.target,
                                   random_state=0)
    splits = load().splits
    assert [s.image_id for s in splits["test"]] == [f"digits-{i}" for i in sorted(test_idx)]
    assert len(splits["train"]) + len(splits["test"]) == len(bunch.images) == 1797
    for s in splits["train"] + splits["test"]:
        i = int(s.image_id.split("-")[1])
        assert s.label == bunch.target[i]
        assert np.array_equal(s.source, (bunch.images[i] * (255.0 / 16.0)).round().astype(np.uint8))


def test_opening_digits_does_not_import_scikit_learn():
    code = "import sys; from trials.datasets import load_dataset; load_dataset('digits'); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
