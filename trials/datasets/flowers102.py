"""Oxford Flowers-102: 8,189 images of 102 flower species, official train/val/test split.

Layout (root may be the folder holding these, e.g. flowers-102, or its parent):
  jpg/image_00001.jpg ...  from 102flowers.tgz
  imagelabels.mat          `labels`: 1×N, class of image n at position n (1-based)
  setid.mat                `trnid`, `valid`, `tstid`: 1-based image numbers of each split
Class names are numbered ("class_001" is label 0, up to the highest label: 102 for the published files,
which carry no names).
The .mat helpers here (`read_mat`, `mat_ints`, `mat_strings`) also serve stanford_cars and stanford_dogs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trials.datasets.base import DatasetError, DatasetSplits, Sample, find_root, image_path, require_file

DATASET = "flowers102"
# the published archive's classes and official split sizes (`diffsweep plan --published-sizes`)
PUBLISHED = (102, {"train": 1020, "val": 1020, "test": 6149})
SPLITS = {"train": "trnid", "val": "valid", "test": "tstid"}


def read_mat(path: Path, dataset: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named variables of a MATLAB file, unsqueezed (a 1-element vector stays an array)."""
    from scipy.io import loadmat

    require_file(path, dataset)
    try:
        data = loadmat(path, squeeze_me=False)
    except Exception as e:  # scipy raises ValueError, MatReadError, OSError... for a damaged file
        raise DatasetError(f"{dataset}: {path} cannot be read as a MATLAB .mat file ({type(e).__name__})") from None
    missing = [k for k in keys if k not in data]
    if missing:
        have = ", ".join(k for k in data if not k.startswith("__")) or "none"
        raise DatasetError(f"{dataset}: {path} has no variable {missing[0]!r} (it has: {have})")
    return {k: data[k] for k in keys}


def mat_ints(values: np.ndarray, where: str, dataset: str) -> np.ndarray:
    """A numeric vector, or a struct field (one 1×1 array per element), as a flat int64 array."""
    values = np.asarray(values)
    if values.dtype == object:
        items = [np.asarray(v).ravel() for v in values.ravel()]
        if any(item.size != 1 for item in items):
            raise DatasetError(f"{dataset}: {where} holds a non-scalar entry; expected one number per image")
        values = np.array([item[0] for item in items]) if items else np.zeros(0, dtype=np.int64)
    flat = values.ravel()
    if flat.dtype.kind not in "iuf":
        raise DatasetError(f"{dataset}: {where} has {flat.dtype} values; expected integers")
    ints = flat.astype(np.int64)
    if not np.array_equal(ints, flat):
        raise DatasetError(f"{dataset}: {where} has non-integer values; expected integers")
    return ints


def mat_strings(values: np.ndarray, where: str, dataset: str) -> list[str]:
    """A cell array (or struct field) of strings as a flat list of str."""
    values = np.asarray(values)
    if values.dtype.kind == "U":  # a char matrix: one string per row
        return [str(v).strip() for v in values.ravel()]
    if values.dtype != object:
        raise DatasetError(f"{dataset}: {where} has {values.dtype} values; expected a cell array of strings")
    out = []
    for item in values.ravel():
        item = np.asarray(item)
        if item.dtype.kind != "U" or item.size > 1:
            raise DatasetError(f"{dataset}: {where} holds a {item.dtype} entry of shape {item.shape}; expected "
                               "a string")
        out.append(str(item.ravel()[0]) if item.size else "")
    return out


def load(root: str | Path | None = None) -> DatasetSplits:
    if root is None:
        raise DatasetError(f"{DATASET}: no dataset root given; pass --root PATH of the folder with imagelabels.mat")
    base = find_root(root, "imagelabels.mat", DATASET)
    labels_mat, setid_mat = base / "imagelabels.mat", base / "setid.mat"
    labels = mat_ints(read_mat(labels_mat, DATASET, ("labels",))["labels"], f"{labels_mat} 'labels'", DATASET)
    if labels.size == 0 or labels.min() < 1:
        raise DatasetError(f"{DATASET}: {labels_mat} 'labels' is empty or below 1; expected classes 1..102")
    setid = read_mat(setid_mat, DATASET, tuple(SPLITS.values()))
    out = DatasetSplits(DATASET, [f"class_{k:03d}" for k in range(1, int(labels.max()) + 1)])
    for split, key in SPLITS.items():
        numbers = mat_ints(setid[key], f"{setid_mat} {key!r}", DATASET)
        out.splits[split] = []
        for n in numbers.tolist():
            if not 1 <= n <= labels.size:
                raise DatasetError(f"{DATASET}: {setid_mat} {key!r} names image {n}, but {labels_mat} labels "
                                   f"images 1..{labels.size}")
            name = f"image_{n:05d}"
            path = image_path(base, f"jpg/{name}.jpg", DATASET, setid_mat)
            out.splits[split].append(Sample(name, path, int(labels[n - 1]) - 1))
    return out
