"""Exported selection: `<dataset>.yaml` (everything needed to recompute the feature and the head)
and `<dataset>.safetensors` (the head's weights). `diffsweep predict` needs nothing else."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file


PACKAGE_PREFIX = "package:trials/checkpoints/"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # world-readable like the rest of the export (some writers create 0600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def portable_checkpoint_path(path: str | None) -> str | None:
    """A checkpoint shipped in the package's `trials/checkpoints/` (the quickstart's DDPM, or one an
    example was made with) is named relative to the package, so an export works from any clone."""
    from orchestrator.config import SHIPPED_CHECKPOINT

    if path and Path(path).resolve().parent == SHIPPED_CHECKPOINT.resolve().parent:
        return f"{PACKAGE_PREFIX}{Path(path).name}"
    return path


def resolve_checkpoint_path(path: str) -> Path:
    from orchestrator.config import SHIPPED_CHECKPOINT

    if path.startswith(PACKAGE_PREFIX):
        return SHIPPED_CHECKPOINT.parent / path[len(PACKAGE_PREFIX):]
    return Path(path).expanduser()


def export_selection(cfg, setup, dataset: str, *, members, val_acc: float, test_acc: float, out_dir: Path,
                     parent_run_id: str, run_ids: list[str | None]) -> list[Path]:
    """Write `<dataset>.yaml` + `<dataset>.safetensors` for a selection of one trained head, or of
    several (`members`, orchestrator.select.Member) exported as one `trials.ensemble.EnsembleHead`."""
    from trials.ensemble import EnsembleHead
    from trials.features import dataset_splits, preprocessing
    from trials.trainable import head_hparams, trial_draws

    classes, splits = dataset_splits(setup.datasets[dataset])
    spec = setup.datasets[dataset]
    backbone = setup.backbone
    maps = list(dict.fromkeys(m for member in members for m in member.maps))  # union, first use first

    def head_doc(member) -> dict[str, Any]:
        return {"type": member.config["head"], "hparams": head_hparams(member.config),
                "params": int(member.row["head_params"])}

    def shapes(member) -> list[list[int]]:
        return [list(a.shape[1:]) for a in member.trainer.train]

    def chosen(member) -> dict[str, Any]:
        return {"t": int(member.config["t"]), "block": int(member.config["block"]),
                "pool": member.config.get("pool")}

    test = {"val_acc": round(val_acc, 6), "test_acc": round(test_acc, 6), "test_n": len(splits["test"]),
            "chosen_on": "validation"}
    if len(members) == 1:
        (member,) = members
        head, selection, model = head_doc(member), {**chosen(member), **test}, member.trainer.model
        feature_shapes = shapes(member)
    else:
        listed = [{**head_doc(m), "maps": [list(x) for x in m.maps], "shapes": shapes(m), **chosen(m),
                   "val_acc": round(float(m.row["val_acc"]), 6), "run_id": r} for m, r in zip(members, run_ids)]
        head = {"type": "ensemble", "params": sum(m["params"] for m in listed), "members": listed}
        selection = {"members": len(members), **test}
        model = EnsembleHead([m.trainer.model for m in members], [m.maps for m in members], maps)
        feature_shapes = None  # per member: a pooled head records its pooled shape
    doc = {
        "diffsweep_export": 1,
        "dataset": {"name": dataset, "root": spec.root, "val_fraction": spec.val_fraction,
                    "limit": dict(spec.limits), "options": dict(spec.options), "seed": spec.seed,
                    "num_classes": len(classes), "classes": classes},
        "checkpoint": {"path": portable_checkpoint_path(backbone.checkpoint), "sha256": backbone.sha256,
                       "arch": backbone.flags, "schedule": backbone.schedule,
                       "class_label": backbone.class_label},
        "features": {"maps": [list(m) for m in maps], "noise_seed": setup.noise_seed,
                     # every member reads maps of the same draws (orchestrator.select.ensemble_members)
                     "noise_draws": trial_draws(members[0].config), "numeric": setup.numeric,
                     "max_spatial": setup.max_spatial, "preprocessing": preprocessing(backbone.flags),
                     **({"shapes": feature_shapes} if feature_shapes is not None else {})},
        "head": head,
        "selection": selection,
        "mlflow": {"tracking_uri": cfg.tracking.uri, "parent_run_id": parent_run_id,
                   **({"run_id": run_ids[0]} if len(members) == 1 else {})},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    yaml_path, weights_path = out_dir / f"{dataset}.yaml", out_dir / f"{dataset}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(weights_path, lambda p: save_file(state, str(p)))
    _atomic_write(yaml_path, lambda p: p.write_text(yaml.safe_dump(doc, sort_keys=False)))
    return [yaml_path, weights_path]
