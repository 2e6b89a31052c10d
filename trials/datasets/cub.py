"""CUB-200-2011 (Caltech-UCSD Birds): 11,788 images of 200 species with the official train/test split.

Layout of CUB_200_2011.tgz (root may be the CUB_200_2011 folder or its parent):
  images.txt              "<image id> <path under images/>"
  image_class_labels.txt  "<image id> <class id>"      (class ids 1-based)
  train_test_split.txt    "<image id> <1 = train, 0 = test>"
  classes.txt             "<class id> <NNN.Name>"
  images/NNN.Name/*.jpg
NABirds ships the same files, so nabirds.py reuses `read_rows` and `read_listing` from here.
"""

from __future__ import annotations

import re
from pathlib import Path

from trials.datasets.base import DatasetError, DatasetSplits, Sample, find_root, image_path, require_file

DATASET = "cub"
# the published archive's classes and official split sizes (`diffsweep plan --published-sizes`)
PUBLISHED = (200, {"train": 5994, "test": 5794})
FOLDER = "CUB_200_2011"
MARKER = "images.txt"


def read_rows(path: Path, dataset: str) -> list[tuple[str, str]]:
    """The `KEY VALUE` lines of an annotation file (VALUE may hold spaces); blank lines skipped."""
    try:
        text = require_file(path, dataset).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"{dataset}: {path} is not UTF-8 text; expected the published annotation file") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.strip().split(maxsplit=1)
        if not parts:
            continue
        if len(parts) != 2:
            raise DatasetError(f"{dataset}: {path} line {number} is {line.strip()!r}; expected 'ID VALUE'")
        rows.append((parts[0], parts[1]))
    return rows


def read_mapping(path: Path, dataset: str) -> dict[str, str]:
    """`read_rows` as a dict, refusing an id listed twice."""
    mapping: dict[str, str] = {}
    for key, value in read_rows(path, dataset):
        if key in mapping:
            raise DatasetError(f"{dataset}: {path} lists id {key!r} twice; expected one line per id")
        mapping[key] = value
    return mapping


def numeric_ids(path: Path, ids, dataset: str) -> list[str]:
    """Class ids sorted as numbers (so "99" comes before "295"), refusing ids that are not integers."""
    for i in ids:
        if not i.isdigit():
            raise DatasetError(f"{dataset}: {path} has class id {i!r}; expected a non-negative integer")
    return sorted(ids, key=int)


def read_listing(base: Path, dataset: str) -> list[tuple[str, str, str, bool]]:
    """(image id, path under images/, class id, is_train) for each line of images.txt, in file order."""
    images_txt = base / "images.txt"
    labels_txt, split_txt = base / "image_class_labels.txt", base / "train_test_split.txt"
    images = read_mapping(images_txt, dataset)
    labels = read_mapping(labels_txt, dataset)
    is_train = read_mapping(split_txt, dataset)
    listing = []
    for image_id, relative in images.items():
        if image_id not in labels:
            raise DatasetError(f"{dataset}: {labels_txt} has no class for image id {image_id!r} of images.txt")
        flag = is_train.get(image_id)
        if flag not in ("0", "1"):
            found = "no line" if flag is None else repr(flag)
            raise DatasetError(f"{dataset}: {split_txt} has {found} for image id {image_id!r}; expected 1 (train) "
                               "or 0 (test)")
        listing.append((image_id, relative, labels[image_id], flag == "1"))
    return listing


def locate(root: str | Path | None, folder: str, dataset: str) -> Path:
    """find_root, but a child named `folder` wins (a parent may hold both CUB_200_2011 and nabirds)."""
    if root is None:
        raise DatasetError(f"{dataset}: no dataset root given; pass --root PATH of the unpacked {folder} folder")
    named = Path(root).expanduser() / folder
    return find_root(named if (named / MARKER).is_file() else root, MARKER, dataset)


def load(root: str | Path | None = None) -> DatasetSplits:
    base = locate(root, FOLDER, DATASET)
    classes_txt = base / "classes.txt"
    class_names = read_mapping(classes_txt, DATASET)
    class_ids = numeric_ids(classes_txt, class_names, DATASET)
    index = {cid: i for i, cid in enumerate(class_ids)}
    # "001.Black_footed_Albatross" -> "Black_footed_Albatross"
    out = DatasetSplits(DATASET, [re.sub(r"^\d+\.", "", class_names[cid]) for cid in class_ids])
    out.splits = {"train": [], "test": []}
    images_txt = base / "images.txt"
    for image_id, relative, class_id, is_train in read_listing(base, DATASET):
        if class_id not in index:
            raise DatasetError(f"{DATASET}: {base / 'image_class_labels.txt'} gives image id {image_id!r} class "
                               f"{class_id!r}, which is not in {classes_txt}")
        path = image_path(base, f"images/{relative}", DATASET, images_txt)
        out.splits["train" if is_train else "test"].append(Sample(relative, path, index[class_id]))
    return out
