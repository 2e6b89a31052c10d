"""Use an exported selection: label images (`predict`) or score a dataset split (`evaluate`).

Features are recomputed with the same function the store used (`trials.features.extract_batch`), so
`evaluate` reproduces the test accuracy the sweep reported.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from orchestrator.export import resolve_checkpoint_path
from trials.datasets import DatasetError
from trials.ddpm import sha256_file
from trials.features import BackboneSpec, DatasetSpec, class_labels, dataset_splits, extract_batch, load_backbone
from trials.heads import build_head_for_maps
from trials.store import FeatureArray
from trials.train_head import split_hparams
from trials.unet import CheckpointError


class ExportError(ValueError):
    pass


@dataclass
class Exported:
    doc: dict[str, Any]
    head: torch.nn.Module
    backbone: BackboneSpec

    @property
    def maps(self) -> list[tuple[int, int]]:
        return [tuple(m) for m in self.doc["features"]["maps"]]


def load_exported(path: str | Path) -> Exported:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"exported config {path}: not found; pass exported/<dataset>.yaml from a finished sweep")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise ExportError(f"exported config {path}: not valid YAML; pass the file `diffsweep run` wrote") from None
    if not isinstance(doc, dict) or doc.get("diffsweep_export") != 1:
        raise ExportError(f"exported config {path}: not a diffsweep export; pass exported/<dataset>.yaml")
    ck = doc["checkpoint"]
    if ck["path"] is None:
        spec = BackboneSpec(tuple(sorted(ck["arch"].items())), None, ck["sha256"], ck["schedule"],
                            ck.get("class_label"))
    else:
        weights = resolve_checkpoint_path(ck["path"])
        if not weights.is_file():
            raise ExportError(f"exported config {path}: checkpoint {weights} not found; restore it at that path")
        if sha256_file(weights) != ck["sha256"]:
            raise ExportError(f"exported config {path}: checkpoint {weights} does not match its sha256; "
                              "use the checkpoint the sweep used")
        spec = BackboneSpec(tuple(sorted(ck["arch"].items())), str(weights), ck["sha256"], ck["schedule"],
                            ck.get("class_label"))
    h = doc["head"]
    head_kw, _ = split_hparams(h["hparams"])  # optimisation settings do not shape the head
    head = build_head_for_maps(h["type"], doc["features"]["shapes"], doc["dataset"]["num_classes"], **head_kw)
    weights = path.with_suffix(".safetensors")
    if not weights.is_file():
        raise ExportError(f"exported config {path}: head weights {weights} missing; export the sweep again")
    head.load_state_dict(load_file(str(weights)))
    return Exported(doc, head.eval(), spec)


def features_for(exp: Exported, x: torch.Tensor, image_ids: list[str]) -> list[torch.Tensor]:
    f = exp.doc["features"]
    model = load_backbone(exp.backbone)
    by_t: dict[int, list[int]] = {}
    for t, b in exp.maps:
        by_t.setdefault(t, []).append(b)
    captured = {(t, b): m for t, blocks in by_t.items()
                for b, m in extract_batch(model, x, image_ids, t, blocks, f["noise_seed"], f["max_spatial"],
                                          exp.backbone.schedule,
                                          y=class_labels(exp.backbone, len(image_ids), next(model.parameters()).device)).items()}
    return [torch.from_numpy(captured[m]).float() for m in exp.maps]


@torch.no_grad()
def logits(exp: Exported, x: torch.Tensor, image_ids: list[str]) -> torch.Tensor:
    maps = features_for(exp, x, image_ids)
    return exp.head(maps[0] if len(maps) == 1 else maps)


def evaluate(config_path: str | Path, split: str = "test", batch_size: int = 256) -> dict[str, Any]:
    from trials.datasets.preprocess import iter_batches

    exp = load_exported(config_path)
    d = exp.doc["dataset"]
    spec = DatasetSpec(d["name"], d["root"], d["val_fraction"], tuple(sorted(d["limit"].items())),
                       False, tuple(sorted(d["options"].items())), d["seed"])
    _, splits = dataset_splits(spec)
    if split not in splits:
        raise ExportError(f"split '{split}' unknown; use one of {', '.join(splits)}")
    pre = exp.doc["features"]["preprocessing"]
    correct = total = 0
    for x, batch in iter_batches(splits[split], pre["image_size"], pre["channels"], batch_size):
        pred = logits(exp, torch.from_numpy(x), [s.image_id for s in batch]).argmax(1).numpy()
        correct += int((pred == np.array([s.label for s in batch])).sum())
        total += len(batch)
    return {"dataset": d["name"], "split": split, "n": total, "accuracy": correct / max(total, 1)}


def predict(config_path: str | Path, images: list[str]) -> list[tuple[str, str]]:
    """Label image files. The noise seed for a file is keyed by its content hash (a stable image id)."""
    from trials.datasets.preprocess import open_image, to_model_input

    exp = load_exported(config_path)
    pre = exp.doc["features"]["preprocessing"]
    arrays, ids = [], []
    for image in images:
        p = Path(image)
        if not p.is_file():
            raise DatasetError(f"image {p}: file not found; pass paths of image files")
        arrays.append(to_model_input(open_image(p, pre["channels"]), pre["image_size"]))
        ids.append(hashlib.sha256(p.read_bytes()).hexdigest())
    pred = logits(exp, torch.from_numpy(np.stack(arrays)), ids).argmax(1).tolist()
    classes = exp.doc["dataset"]["classes"]
    return [(image, classes[i]) for image, i in zip(images, pred)]


__all__ = ["CheckpointError", "ExportError", "FeatureArray", "evaluate", "load_exported", "predict"]
