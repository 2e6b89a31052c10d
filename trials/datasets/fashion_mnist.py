"""Fashion-MNIST as IDX gz files (Debian's `dataset-fashion-mnist` puts them in DEFAULT_ROOT)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from trials.datasets.base import DatasetError, DatasetSplits, Sample, find_root, require_file

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): magic, dims, then big-endian unsigned bytes."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DatasetError(f"fashion_mnist: {path} is not an IDX ubyte file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise DatasetError(f"fashion_mnist: {path} is truncated ({array.size} of {int(np.prod(dims))} values)")
    return array.reshape(dims)


def load(root: str | Path | None = None) -> DatasetSplits:
    if root is None and not DEFAULT_ROOT.exists():
        raise DatasetError(f"fashion_mnist: {DEFAULT_ROOT} not found; run `apt-get install -y "
                           "dataset-fashion-mnist` or pass --root PATH")
    base = find_root(root or DEFAULT_ROOT, FILES["train"][1], "fashion_mnist")
    out = DatasetSplits("fashion_mnist", list(CLASSES))
    for split, (images_file, labels_file) in FILES.items():
        images = read_idx(require_file(base / images_file, "fashion_mnist"))
        labels = read_idx(require_file(base / labels_file, "fashion_mnist"))
        if len(images) != len(labels):
            raise DatasetError(f"fashion_mnist: {images_file} has {len(images)} images but {labels_file} "
                               f"{len(labels)} labels")
        out.splits[split] = [Sample(f"{split}-{i}", images[i], int(labels[i])) for i in range(len(images))]
    return out
