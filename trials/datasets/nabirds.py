"""NABirds: 48,562 photos of North American birds, 555 visual categories, official train/test split.

Same files as CUB-200-2011 (root may be the nabirds folder or its parent), keyed by image UUID:
  images.txt              "<uuid> <NNNN/file.jpg under images/>"
  image_class_labels.txt  "<uuid> <class id>"
  train_test_split.txt    "<uuid> <1 = train, 0 = test>"
  classes.txt             "<class id> <name with spaces>"  (the whole hierarchy: ids are sparse)
Only the class ids that images use become classes, numbered 0..K-1 in ascending id order.
"""

from __future__ import annotations

from pathlib import Path

from trials.datasets.base import DatasetError, DatasetSplits, Sample, image_path
from trials.datasets.cub import locate, numeric_ids, read_listing, read_mapping

DATASET = "nabirds"
# the published archive's classes and official split sizes (`diffsweep plan --published-sizes`)
PUBLISHED = (555, {"train": 23929, "test": 24633})
FOLDER = "nabirds"


def load(root: str | Path | None = None) -> DatasetSplits:
    base = locate(root, FOLDER, DATASET)
    listing = read_listing(base, DATASET)
    classes_txt = base / "classes.txt"
    names = read_mapping(classes_txt, DATASET)
    used = numeric_ids(base / "image_class_labels.txt", {class_id for _, _, class_id, _ in listing}, DATASET)
    for class_id in used:
        if class_id not in names:
            raise DatasetError(f"{DATASET}: {base / 'image_class_labels.txt'} uses class id {class_id!r}, which "
                               f"is not in {classes_txt}")
    index = {cid: i for i, cid in enumerate(used)}
    out = DatasetSplits(DATASET, [names[cid] for cid in used])
    out.splits = {"train": [], "test": []}
    images_txt = base / "images.txt"
    for uuid, relative, class_id, is_train in listing:
        path = image_path(base, f"images/{relative}", DATASET, images_txt)
        out.splits["train" if is_train else "test"].append(Sample(uuid, path, index[class_id]))
    return out
