"""What every dataset loader returns, and the checks they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """A dataset that cannot be read as published; the message names the file and the fix."""


@dataclass(frozen=True)
class Sample:
    image_id: str  # stable across runs: seeds the noise and keys the feature store
    # an image file, or the pixels themselves (H×W or H×W×C uint8); not compared, so that samples
    # holding arrays still hash and compare (by id and label)
    source: Path | np.ndarray = field(compare=False)
    label: int


@dataclass
class DatasetSplits:
    """Splits exactly as published on disk ("train", "val", "test"), plus the class names."""

    name: str
    classes: list[str]
    splits: dict[str, list[Sample]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}


def find_root(root: str | Path, marker: str, dataset: str) -> Path:
    """`root` may be the folder the archive unpacks to or its parent; return the one holding `marker`."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"{dataset}: dataset root {root} does not exist; pass --root PATH of the unpacked archive")
    if not root.is_dir():
        raise DatasetError(f"{dataset}: dataset root {root} is a file, not a folder; unpack the archive and "
                           "pass the folder")
    if (root / marker).exists():
        return root
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if (child / marker).exists():
            return child
    raise DatasetError(f"{dataset}: {root / marker} not found; point root at the unpacked "
                       f"{dataset} folder (or its parent)")


def require_file(path: Path, dataset: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{dataset}: annotation file {path} is missing; the published layout has it there")
    return path


def image_path(root: Path, relative: str, dataset: str, annotation: Path) -> Path:
    """Resolve an image named by an annotation file, refusing paths that leave the dataset root.

    Checked lexically (absolute paths and `..` are refused) rather than by following links, so an
    `images/` folder that is a symlink to another disk still works."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise DatasetError(f"{dataset}: {annotation} names {relative!r}, which lies outside the dataset root")
    path = root / rel
    if not path.is_file():
        raise DatasetError(f"{dataset}: {annotation} names image {relative!r}, which is not at {path}")
    return path
