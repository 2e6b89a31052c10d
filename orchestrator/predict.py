"""Use an exported selection: label images (`predict`) or score a dataset split (`evaluate`).

Both run `orchestrator.classifier.Classifier`, whose features are recomputed with the function the
store used (`trials.features.extract_batch`), so `evaluate` reproduces the test accuracy the sweep
reported and `predict` gives a dataset image the answer `evaluate` gives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from orchestrator.export import resolve_checkpoint_path
from trials.ddpm import sha256_file
from trials.features import BackboneSpec
from trials.ensemble import EnsembleHead
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
    head = build_exported_head(doc)
    weights = path.with_suffix(".safetensors")
    if not weights.is_file():
        raise ExportError(f"exported config {path}: head weights {weights} missing; export the sweep again")
    head.load_state_dict(load_file(str(weights)))
    return Exported(doc, head.eval(), spec)


def build_exported_head(doc: dict[str, Any]) -> torch.nn.Module:
    """The untrained head an export describes: one head, or an ensemble of its members."""
    def build(h: dict[str, Any], shapes) -> torch.nn.Module:
        head_kw, _ = split_hparams(h["hparams"])  # optimisation settings do not shape the head
        return build_head_for_maps(h["type"], shapes, doc["dataset"]["num_classes"], **head_kw)

    h = doc["head"]
    if h["type"] != "ensemble":
        return build(h, doc["features"]["shapes"])
    return EnsembleHead([build(m, m["shapes"]) for m in h["members"]], [m["maps"] for m in h["members"]],
                        doc["features"]["maps"])


def classifier(config_path: str | Path, device: str = "cpu"):
    """The export as a `Classifier` (one forward path for predict, evaluate and the Python API)."""
    from orchestrator.classifier import Classifier

    return Classifier(load_exported(config_path), device=device)


def evaluate(config_path: str | Path, split: str = "test", batch_size: int = 256, device: str = "cpu") -> dict[str, Any]:
    return classifier(config_path, device).evaluate(split, batch_size=batch_size)


def predict(config_path: str | Path, images: list, batch_size: int = 64, device: str = "cpu", top_k: int = 1):
    """Label images (`Prediction`s, one per image, in order; an unreadable image has `error` set).
    Noise ids follow the one convention of `orchestrator.classifier`."""
    return classifier(config_path, device).predict(images, batch_size=batch_size, top_k=top_k)


__all__ = ["CheckpointError", "ExportError", "FeatureArray", "evaluate", "load_exported", "predict"]
