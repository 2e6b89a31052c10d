"""ImageNet-style class folders: train/<class>/<image> and val/<class>/<image>.

Root is the folder holding train/ and val/, or its parent.
Classes are the sorted folder names under train/ (label = position); a val folder must name one of them.
Images are files with an image extension (any case), found in each class folder and its subfolders;
other files (README.txt, .DS_Store) are ignored. image_id is the path under the root ("val/n01440764/x.JPEG").
The flat ImageNet val folder (images plus a ground-truth file) must first be sorted into class folders.
"""

from __future__ import annotations

import os
from pathlib import Path

from trials.datasets.base import DatasetError, DatasetSplits, Sample, find_root

DATASET = "imagefolder"
SPLITS = ("train", "val")
EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in EXTENSIONS


def class_folders(split_dir: Path) -> list[str]:
    """Sorted class folder names of a split, refusing images that sit outside a class folder."""
    if not split_dir.is_dir():
        raise DatasetError(f"{DATASET}: folder {split_dir} is missing; expected {split_dir.name}/<class>/<image> "
                           "beside train/")
    folders, loose = [], []
    with os.scandir(split_dir) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                folders.append(entry.name)
            elif is_image(entry.name):
                loose.append(entry.name)
    if loose:
        raise DatasetError(f"{DATASET}: {split_dir} holds image {sorted(loose)[0]!r} outside a class folder; "
                           f"expected {split_dir.name}/<class>/<image>")
    return sorted(folders)


def images_under(folder: Path, base: Path) -> list[tuple[str, Path]]:
    """(path under the root, path) of each image below `folder`, in sorted order."""
    found = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if is_image(name):
                path = Path(directory) / name
                if not path.is_file():
                    raise DatasetError(f"{DATASET}: image {path} is not a readable file (a broken link?)")
                found.append((path.relative_to(base).as_posix(), path))
    return found


def load(root: str | Path | None = None) -> DatasetSplits:
    if root is None:
        raise DatasetError(f"{DATASET}: no dataset root given; pass --root PATH of the folder holding train/ and val/")
    base = find_root(root, "train", DATASET)
    classes = class_folders(base / "train")
    if not classes:
        raise DatasetError(f"{DATASET}: {base / 'train'} has no class folders; expected train/<class>/<image>")
    index = {name: i for i, name in enumerate(classes)}
    out = DatasetSplits(DATASET, classes)
    for split in SPLITS:
        out.splits[split] = []
        for name in class_folders(base / split):
            if name not in index:
                raise DatasetError(f"{DATASET}: {base / split / name} is a class folder not in {base / 'train'}; "
                                   "expected val classes to be train classes")
            found = images_under(base / split / name, base)
            out.splits[split] += [Sample(relative, path, index[name]) for relative, path in found]
    return out
