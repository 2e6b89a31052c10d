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
    """The shipped checkpoint is named relative to the package, so an export works from any clone."""
    from orchestrator.config import SHIPPED_CHECKPOINT

    if path and Path(path).resolve() == SHIPPED_CHECKPOINT.resolve():
        return f"{PACKAGE_PREFIX}{SHIPPED_CHECKPOINT.name}"
    return path


def resolve_checkpoint_path(path: str) -> Path:
    from orchestrator.config import SHIPPED_CHECKPOINT

    if path.startswith(PACKAGE_PREFIX):
        return SHIPPED_CHECKPOINT.parent / path[len(PACKAGE_PREFIX):]
    return Path(path).expanduser()


def export_selection(cfg, setup, dataset: str, config: dict[str, Any], trainer, val_acc: float, test_acc: float,
                     out_dir: Path, parent_run_id: str, run_id: str | None, head_params: int) -> list[Path]:
    from trials.features import dataset_splits, preprocessing
    from trials.trainable import head_hparams, trial_draws, trial_maps

    classes, splits = dataset_splits(setup.datasets[dataset])
    spec = setup.datasets[dataset]
    backbone = setup.backbone
    arrays = trainer.train
    doc = {
        "diffsweep_export": 1,
        "dataset": {"name": dataset, "root": spec.root, "val_fraction": spec.val_fraction,
                    "limit": dict(spec.limits), "options": dict(spec.options), "seed": spec.seed,
                    "num_classes": len(classes), "classes": classes},
        "checkpoint": {"path": portable_checkpoint_path(backbone.checkpoint), "sha256": backbone.sha256,
                       "arch": backbone.flags, "schedule": backbone.schedule,
                       "class_label": backbone.class_label},
        "features": {"maps": [list(m) for m in trial_maps(config)], "noise_seed": setup.noise_seed,
                     "noise_draws": trial_draws(config), "numeric": setup.numeric,
                     "max_spatial": setup.max_spatial, "preprocessing": preprocessing(backbone.flags),
                     "shapes": [list(a.shape[1:]) for a in arrays]},
        "head": {"type": config["head"], "hparams": head_hparams(config), "params": head_params},
        "selection": {"t": int(config["t"]), "block": int(config["block"]), "pool": config.get("pool"),
                      "val_acc": round(val_acc, 6), "test_acc": round(test_acc, 6),
                      "test_n": len(splits["test"]), "chosen_on": "validation"},
        "mlflow": {"tracking_uri": cfg.tracking.uri, "parent_run_id": parent_run_id, "run_id": run_id},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    yaml_path, weights_path = out_dir / f"{dataset}.yaml", out_dir / f"{dataset}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()}
    _atomic_write(weights_path, lambda p: save_file(state, str(p)))
    _atomic_write(yaml_path, lambda p: p.write_text(yaml.safe_dump(doc, sort_keys=False)))
    return [yaml_path, weights_path]
