"""After the sweep: one row per trial, the best config per dataset on validation, test once, export."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from orchestrator.tracking import trial_status

PARAM_COLUMNS = ("dataset", "head", "t", "block", "pool")


def row_config(row: pd.Series) -> dict[str, Any]:
    """A trial's config back from its results row, as plain Python values (no numpy scalars, no NaN)."""
    config = json.loads(row["hparams"])
    for k in PARAM_COLUMNS:
        v = row[k]
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        config[k] = v.item() if hasattr(v, "item") else v
    return config


def results_table(grid, max_t: int) -> pd.DataFrame:
    """One row per trial: its config, last/best val_acc, epochs run, status, head size, checkpoint."""
    rows = []
    for result in grid:
        config = dict(result.config or {})
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        best = float(history["val_acc"].max()) if history is not None and "val_acc" in history else None
        epoch = int(metrics.get("epoch", 0) or 0)
        rows.append({
            "trial_id": metrics.get("trial_id") or (result.path and os.path.basename(result.path)),
            **{k: config.get(k) for k in PARAM_COLUMNS},
            "hparams": json.dumps({k: v for k, v in config.items() if k not in PARAM_COLUMNS}, sort_keys=True),
            "val_acc": metrics.get("val_acc"), "best_val_acc": best, "epochs": epoch,
            "status": trial_status(epoch, max_t, result.error is not None),
            "head_params": metrics.get("head_params"),
            "map_weights": metrics.get("map_weights"),  # JSON [[t, block, weight], ...] from a mixing head
            "checkpoint": _checkpoint_uri(result.checkpoint),
            "error": error_line(result.error),
            "log": str(error_log(result.path)) if result.error is not None and result.path else None,
        })
    return pd.DataFrame(rows)


def error_log(trial_path: str) -> Path:
    """Where Tune keeps a failed trial's full traceback in the sweep's storage (readable without Ray)."""
    return Path(trial_path) / "error.txt"


def error_line(error) -> str | None:
    """The last line of a trial's error (Tune wraps the trial's own exception; its message is last)."""
    if error is None:
        return None
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _checkpoint_uri(checkpoint) -> str | None:
    if checkpoint is None:
        return None
    fs = checkpoint.filesystem
    return checkpoint.path if fs is None or fs.type_name == "local" else f"{fs.type_name}://{checkpoint.path}"


def select_top(table: pd.DataFrame, k: int = 1) -> dict[str, pd.DataFrame]:
    """Per dataset, its k best trials among those that ran to max_t: highest final validation
    accuracy first; ties go to the smaller head, then to the earlier trial. Test accuracy plays no part."""
    chosen = {}
    for dataset, rows in table[table.status == "completed"].groupby("dataset"):
        rows = rows.assign(_order=range(len(rows))).sort_values(["val_acc", "head_params", "_order"],
                                                                 ascending=[False, True, True])
        chosen[dataset] = rows.drop(columns="_order").iloc[:k]
    return chosen


def select_best(table: pd.DataFrame) -> dict[str, pd.Series]:
    """Per dataset, the best trial of `select_top`."""
    return {dataset: rows.iloc[0] for dataset, rows in select_top(table, 1).items()}


def mixing_rank_correlation(rows: pd.DataFrame) -> tuple[pd.Series, float] | None:
    """The best completed trial that learned (t, block) weights (mixing), and the Spearman rank
    correlation of its weights with the best val_acc of the single-map trials at the same cells
    (NaN when fewer than two cells have both). None when no such trial completed."""
    from scipy.stats import spearmanr

    from orchestrator.plots import accuracy_grid, weights_grid

    done = rows[(rows.status == "completed") & rows["map_weights"].notna()]
    if done.empty:
        return None
    best = done.sort_values("val_acc", ascending=False).iloc[0]
    acc = accuracy_grid(rows).stack()  # the single-map trials' cells
    if acc.empty:
        return best, float("nan")
    weights = weights_grid(json.loads(best["map_weights"])).stack()
    both = pd.concat([acc.rename("acc"), weights.rename("w")], axis=1).dropna()
    if len(both) < 2 or both["acc"].nunique() < 2 or both["w"].nunique() < 2:
        return best, float("nan")
    return best, float(spearmanr(both["acc"], both["w"]).statistic)


@dataclass(frozen=True)
class Member:
    """One trained head of a selection (a selection of one, or an ensemble's member)."""
    row: pd.Series
    config: dict[str, Any]
    trainer: Any  # trials.train_head.HeadTrainer, restored from the trial's checkpoint

    @property
    def maps(self) -> list[tuple[int, int]]:
        from trials.trainable import trial_maps
        return trial_maps(self.config)


def restore_trainer(setup, row: pd.Series, arrays):
    from trials.features import dataset_splits
    from trials.train_head import HeadTrainer
    from trials.trainable import WEIGHTS_FILE, head_hparams

    config = row_config(row)
    num_classes = len(dataset_splits(setup.datasets[row["dataset"]])[0])
    trainer = HeadTrainer(row["head"], head_hparams(config), arrays, num_classes, setup.recipe, setup.seed,
                          trainable=False)
    from ray.tune import Checkpoint

    with Checkpoint(row["checkpoint"]).as_directory() as d:  # a local path or a storage URI (s3://, gs://)
        state = torch.load(Path(d) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    trainer.load_state_dict(state)
    return trainer, config


def split_arrays(setup, coordinator, dataset: str, split: str, config: dict[str, Any]) -> list:
    """What a trial's head reads of one split (its maps, or their pooled caches)."""
    from trials.trainable import load_split, trial_draws, trial_maps, trial_pool

    return load_split(setup, dataset, split, trial_maps(config), trial_pool(config), coordinator,
                      draws=trial_draws(config))


def split_accuracy(members: list[Member], arrays: list[list]) -> float:
    """The accuracy of the members' mean probability, each member on its own arrays of one split."""
    from trials.ensemble import mean_softmax

    logits = [m.trainer.logits(a) for m, a in zip(members, arrays)]
    return float((mean_softmax(logits).argmax(1).numpy() == arrays[0][0].labels).mean())


def restore_member(setup, coordinator, dataset: str, split: str, row: pd.Series) -> tuple[Member, list]:
    """A trial's head restored from its checkpoint, with what it reads of `split`."""
    config = row_config(row)
    arrays = split_arrays(setup, coordinator, dataset, split, config)
    return Member(row, config, restore_trainer(setup, row, arrays)[0]), arrays


def ensemble_members(setup, coordinator, dataset: str, top: pd.DataFrame) -> tuple[list[Member], float] | None:
    """The top trials as an ensemble, with its val_acc, when the mean of their probabilities is more
    accurate on validation than the best trial alone (a tie keeps the single trial: None)."""
    from trials.trainable import trial_draws

    best_acc = float(top.iloc[0]["val_acc"])
    # an export extracts once: members read maps of the best trial's number of noise draws
    draws = [trial_draws(row_config(row)) for _, row in top.iterrows()]
    top = top[[d == draws[0] for d in draws]]
    if len(top) < 2:
        return None
    members, val = zip(*(restore_member(setup, coordinator, dataset, "val", row) for _, row in top.iterrows()))
    ensemble_acc = split_accuracy(list(members), list(val))
    print(f"{dataset}: ensemble of the {len(members)} best trials: val_acc {ensemble_acc:.4f}, best single "
          f"{best_acc:.4f}", flush=True)
    return (list(members), ensemble_acc) if ensemble_acc > best_acc else None


def select_and_export(cfg, setup, grid, parent, callback, register_model: str | None = None) -> Any:
    from orchestrator.export import export_selection
    from orchestrator.mlflow_model import log_winner, registered_name
    from orchestrator.plots import accuracy_heatmap, weights_heatmap
    from orchestrator.sweep import SweepOutcome  # imported here: sweep imports this module
    from trials.coordinator import get_coordinator
    from trials.features import dataset_splits

    table = results_table(grid, cfg.epochs)
    chosen = select_top(table, cfg.selection.ensemble)
    out_dir = Path(cfg.export_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    coordinator = get_coordinator(cfg.name, setup.extract_options)
    selected: dict[str, dict] = {}
    below_bar: dict[str, dict] = {}  # selections short of selection.min_val_acc
    model_failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        table_path = Path(tmp) / "results.parquet"
        table.to_parquet(table_path, index=False)
        parent.client.log_artifact(parent.run_id, str(table_path))
        for dataset, rows in table.groupby("dataset"):
            png = accuracy_heatmap(rows, Path(tmp) / f"{dataset}_t_block_val_acc.png", title=f"{dataset}: best val_acc")
            parent.client.log_artifact(parent.run_id, str(png), artifact_path="heatmaps")
            (out_dir / png.name).write_bytes(png.read_bytes())
            mixing = mixing_rank_correlation(rows)
            if mixing is not None:  # beside the val_acc heatmap: what the best mixing head learned to read
                best, rho = mixing
                png = weights_heatmap(json.loads(best["map_weights"]), Path(tmp) / f"{dataset}_mixing_weights.png",
                                      title=f"{dataset}: mixing weights (%), Spearman vs val_acc {rho:.2f}")
                parent.client.log_artifact(parent.run_id, str(png), artifact_path="heatmaps")
                (out_dir / png.name).write_bytes(png.read_bytes())
                if np.isfinite(rho):
                    parent.client.log_metric(parent.run_id, f"{dataset}.mixing_rank_corr", rho)
        for dataset, top in chosen.items():
            ensemble = ensemble_members(setup, coordinator, dataset, top)  # validation only
            val_acc = ensemble[1] if ensemble else float(top.iloc[0]["val_acc"])
            configs = [m.config for m in ensemble[0]] if ensemble else [row_config(top.iloc[0])]
            described = [{k: c.get(k) for k in ("head", "t", "block", "pool")} for c in configs]
            head = described[0] if len(described) == 1 else \
                {"head": f"ensemble of {len(described)}", "t": None, "block": None, "pool": None}
            parent.client.log_metric(parent.run_id, f"{dataset}.val_acc", val_acc)
            bar = cfg.selection.bar(dataset)
            if bar is not None and val_acc < bar:  # decided on validation: the test split stays unread
                parent.client.set_tag(parent.run_id, f"diffsweep.below_min_val_acc.{dataset}",
                                      json.dumps({"val_acc": val_acc, "min_val_acc": bar}))
                below_bar[dataset] = {**head, "members": described, "val_acc": val_acc, "min_val_acc": bar}
                continue
            # the test split, once, for the selection
            if ensemble is None:
                member, test = restore_member(setup, coordinator, dataset, "test", top.iloc[0])
                members, test = [member], [test]
            else:
                members = ensemble[0]
                test = [split_arrays(setup, coordinator, dataset, "test", m.config) for m in members]
            test_acc = split_accuracy(members, test)
            run_ids = [callback.run_id_of(m.row["trial_id"]) for m in members]
            files = export_selection(cfg, setup, dataset, members=members, val_acc=val_acc, test_acc=test_acc,
                                     out_dir=out_dir, parent_run_id=parent.run_id, run_ids=run_ids)
            for f in files:
                parent.client.log_artifact(parent.run_id, str(f), artifact_path=f"exported/{dataset}")
            parent.client.log_metric(parent.run_id, f"{dataset}.test_acc", test_acc)
            parent.client.set_tag(parent.run_id, f"diffsweep.winner.{dataset}",
                                  json.dumps(described[0] if len(members) == 1 else described))
            # the winner as an MLflow model under the parent run: runs:/<parent_run_id>/<dataset>
            model_uri = None
            try:
                example = dataset_splits(setup.datasets[dataset])[1]["test"][0].source
                name = registered_name(register_model, dataset, list(setup.datasets))
                log_winner(cfg.tracking.uri, parent.run_id, dataset, files[0], files[1],
                           setup.backbone.checkpoint, example, registered_name=name)
                model_uri = f"runs:/{parent.run_id}/{dataset}"
            except Exception as e:  # noqa: BLE001 - the export is on disk; the sweep's result stands
                model_failures += 1
                print(f"warning: {dataset}: the MLflow model could not be logged ({str(e).splitlines()[0][:200]})",
                      flush=True)
            selected[dataset] = {**head, "members": described, "val_acc": val_acc, "test_acc": test_acc,
                                 "yaml": str(files[0]), "weights": str(files[1]), "model_uri": model_uri}
    table.to_parquet(out_dir / "results.parquet", index=False)
    return SweepOutcome(table, selected, parent.run_id, out_dir, callback.gaps + model_failures, below_bar)
