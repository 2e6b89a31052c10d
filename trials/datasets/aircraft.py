"""FGVC-Aircraft 2013b: 10,000 aircraft photos, labelled at three levels, official train/val/test split.

Layout of fgvc-aircraft-2013b.tar.gz (root may be fgvc-aircraft-2013b or its parent):
  data/variants.txt, data/families.txt, data/manufacturers.txt   one class name per line (names hold spaces)
  data/images_{variant,family,manufacturer}_{train,val,test}.txt "<7-digit image id> <class name>"
  data/images/<image id>.jpg
Class order is the order of the level's class file. Option `level`: "variant" (100 classes, the
default), "family" (70) or "manufacturer" (30). Images keep the 20-pixel copyright banner at the bottom.
"""

from __future__ import annotations

from pathlib import Path

from trials.datasets.base import DatasetError, DatasetSplits, Sample, find_root, image_path, require_file
from trials.datasets.cub import read_rows

DATASET = "aircraft"
# the published archive's classes and official split sizes (`diffsweep plan --published-sizes`)
PUBLISHED = (100, {"train": 3334, "val": 3333, "test": 3333})
LEVELS = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
SPLITS = ("train", "val", "test")


def read_names(path: Path) -> list[str]:
    """One class name per line, blank lines skipped, each name once."""
    try:
        names = [line.strip() for line in require_file(path, DATASET).read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise DatasetError(f"{DATASET}: {path} is not UTF-8 text; expected one class name per line") from None
    names = [n for n in names if n]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise DatasetError(f"{DATASET}: {path} lists class {name!r} twice; expected each name once")
    return names


def load(root: str | Path | None = None, level: str = "variant") -> DatasetSplits:
    if level not in LEVELS:
        raise DatasetError(f"{DATASET}: unknown level {level!r}; expected one of {', '.join(LEVELS)}")
    if root is None:
        raise DatasetError(f"{DATASET}: no dataset root given; pass --root PATH of the unpacked "
                           "fgvc-aircraft-2013b folder")
    classes_file = f"data/{LEVELS[level]}"
    base = find_root(root, classes_file, DATASET)
    classes = read_names(base / classes_file)
    index = {name: i for i, name in enumerate(classes)}
    out = DatasetSplits(DATASET, classes)
    for split in SPLITS:
        listing = base / "data" / f"images_{level}_{split}.txt"
        out.splits[split] = []
        for image_id, name in read_rows(listing, DATASET):
            if name not in index:
                raise DatasetError(f"{DATASET}: {listing} gives image {image_id!r} class {name!r}, which is not "
                                   f"in {base / classes_file}")
            path = image_path(base, f"data/images/{image_id}.jpg", DATASET, listing)
            out.splits[split].append(Sample(image_id, path, index[name]))
    return out
