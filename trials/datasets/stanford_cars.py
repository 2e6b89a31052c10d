"""Stanford Cars: 16,185 images of 196 car models (make, model, year), official train/test split.

torchvision's layout (root may be the stanford_cars folder or its parent):
  devkit/cars_meta.mat                  `class_names`: 1×196 cell of names
  devkit/cars_train_annos.mat           `annotations`: struct array, fields bbox_x1..bbox_y2, class, fname
  cars_test_annos_withlabels.mat        the same for the test images (devkit's cars_test_annos.mat has no class)
  cars_train/00001.jpg, cars_test/00001.jpg
`class` is 1-based. image_id is the path under the root ("cars_train/00001.jpg"): file names repeat across splits.
"""

from __future__ import annotations

from pathlib import Path

from trials.datasets.base import DatasetError, DatasetSplits, Sample, find_root, image_path
from trials.datasets.flowers102 import mat_ints, mat_strings, read_mat

DATASET = "stanford_cars"
# the published archive's classes and official split sizes (`diffsweep plan --published-sizes`)
PUBLISHED = (196, {"train": 8144, "test": 8041})
SPLITS = {"train": ("devkit/cars_train_annos.mat", "cars_train"),
          "test": ("cars_test_annos_withlabels.mat", "cars_test")}


def load(root: str | Path | None = None) -> DatasetSplits:
    if root is None:
        raise DatasetError(f"{DATASET}: no dataset root given; pass --root PATH of the stanford_cars folder")
    base = find_root(root, "devkit/cars_meta.mat", DATASET)
    meta = base / "devkit" / "cars_meta.mat"
    classes = mat_strings(read_mat(meta, DATASET, ("class_names",))["class_names"], f"{meta} 'class_names'", DATASET)
    out = DatasetSplits(DATASET, classes)
    for split, (annos_file, folder) in SPLITS.items():
        annos_path = base / annos_file
        annotations = read_mat(annos_path, DATASET, ("annotations",))["annotations"]
        fields = annotations.dtype.names or ()
        for field in ("class", "fname"):
            if field not in fields:
                raise DatasetError(f"{DATASET}: {annos_path} 'annotations' has no {field!r} field (it has: "
                                   f"{', '.join(fields) or 'none'}); expected the labelled annotations")
        labels = mat_ints(annotations["class"], f"{annos_path} 'class'", DATASET)
        names = mat_strings(annotations["fname"], f"{annos_path} 'fname'", DATASET)
        out.splits[split] = []
        for name, label in zip(names, labels.tolist()):
            if not 1 <= label <= len(classes):
                raise DatasetError(f"{DATASET}: {annos_path} gives {name!r} class {label}; expected 1..{len(classes)} "
                                   f"(the classes of {meta})")
            relative = f"{folder}/{name}"
            out.splits[split].append(Sample(relative, image_path(base, relative, DATASET, annos_path), label - 1))
    return out
