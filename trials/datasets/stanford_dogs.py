"""Stanford Dogs: 20,580 images of 120 breeds (from ImageNet), official train/test split.

Layout of Images.tar + lists.tar unpacked side by side (root may be that folder or its parent):
  Images/<wnid>-<Breed>/<wnid>_<n>.jpg
  train_list.mat, test_list.mat   `file_list` (paths under Images/), `labels` (1-based), `annotation_list`
Class k is named after the folder of its images, without the WordNet id ("n02085620-Chihuahua" -> "Chihuahua");
every image of a label must sit in the same folder.
"""

from __future__ import annotations

from pathlib import Path

from trials.datasets.base import DatasetError, DatasetSplits, Sample, find_root, image_path
from trials.datasets.flowers102 import mat_ints, mat_strings, read_mat

DATASET = "stanford_dogs"
# the published archive's classes and official split sizes (`diffsweep plan --published-sizes`)
PUBLISHED = (120, {"train": 12000, "test": 8580})
SPLITS = {"train": "train_list.mat", "test": "test_list.mat"}


def load(root: str | Path | None = None) -> DatasetSplits:
    if root is None:
        raise DatasetError(f"{DATASET}: no dataset root given; pass --root PATH of the folder holding Images/ "
                           "and train_list.mat")
    base = find_root(root, "train_list.mat", DATASET)
    lists = {}
    for split, file in SPLITS.items():
        path = base / file
        data = read_mat(path, DATASET, ("file_list", "labels"))
        files = mat_strings(data["file_list"], f"{path} 'file_list'", DATASET)
        labels = mat_ints(data["labels"], f"{path} 'labels'", DATASET)
        if len(files) != len(labels):
            raise DatasetError(f"{DATASET}: {path} has {len(files)} files but {len(labels)} labels; expected one "
                               "label per file")
        lists[split] = (path, files, labels.tolist())

    folders: dict[int, str] = {}  # label -> the folder its images sit in
    for path, files, labels in lists.values():
        for file, label in zip(files, labels):
            folder = file.split("/")[0]
            if label < 1:
                raise DatasetError(f"{DATASET}: {path} gives {file!r} label {label}; expected labels from 1")
            if folders.setdefault(label, folder) != folder:
                raise DatasetError(f"{DATASET}: {path} gives label {label} to images in both {folders[label]!r} "
                                   f"and {folder!r}; expected one folder per label")
    missing = [k for k in range(1, max(folders, default=0) + 1) if k not in folders]
    if missing or not folders:
        raise DatasetError(f"{DATASET}: {base / 'train_list.mat'} and test_list.mat use no image of label "
                           f"{missing[0] if missing else 1}; expected labels 1..K with images for each")
    if len(set(folders.values())) != len(folders):
        shared = next(f for f in folders.values() if list(folders.values()).count(f) > 1)
        raise DatasetError(f"{DATASET}: {base / 'train_list.mat'} and test_list.mat give images in {shared!r} "
                           "more than one label; expected one label per folder")
    out = DatasetSplits(DATASET, [folders[k].split("-", 1)[-1] for k in sorted(folders)])
    for split, (path, files, labels) in lists.items():
        out.splits[split] = [Sample(file, image_path(base, f"Images/{file}", DATASET, path), label - 1)
                             for file, label in zip(files, labels)]
    return out
