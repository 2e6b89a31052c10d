"""What the user reads at the end of a sweep, and `diffsweep status`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def print_trial_errors(table) -> None:
    """One line per failed trial, with where its full traceback is (trials log to their own files)."""
    if "error" not in table:
        return
    for _, row in table[table.status == "failed"].iterrows():
        print(f"trial {row['trial_id']} ({row['dataset']}, {row['head']}, t={row['t']}, block={row['block']}) "
              f"failed: {row['error']}; full log: {row['log']}", flush=True)


def print_summary(cfg, outcome) -> int:
    """Print the results; 1 when a dataset has no selected configuration (no trial finished)."""
    table = outcome.results
    counts = table.status.value_counts().to_dict() if len(table) else {}
    print()
    print(f"sweep '{cfg.name}': {len(table)} trials "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    header = f"{'dataset':<16} {'t':>5} {'block':>5} {'pool':>4}  {'head':<13} {'val_acc':>8} {'test_acc':>8}"
    print(header)
    print("-" * len(header))
    below_bar = outcome.below_bar
    for dataset, s in [*outcome.selected.items(), *below_bar.items()]:
        members = s.get("members") or [s]
        test = f"{s['test_acc']:>8.4f}" if s.get("test_acc") is not None else f"{'-':>8}"  # below the bar: unread
        if len(members) > 1:  # an ensemble: its accuracies, then what each member reads
            print(f"{dataset:<16} {'':>5} {'':>5} {'':>4}  {s['head']:<13} {s['val_acc']:>8.4f} {test}")
        for m in members:
            pool = "-" if m.get("pool") in (None, "") else m["pool"]
            name, head = (dataset, m["head"]) if len(members) == 1 else ("", f"+ {m['head']}")
            accuracies = f" {s['val_acc']:>8.4f} {test}" if len(members) == 1 else ""
            print(f"{name:<16} {m['t']:>5} {m['block']:>5} {pool!s:>4}  {head:<13}{accuracies}")
        if dataset in below_bar:
            print(f"{'':<16} val_acc below selection.min_val_acc {s['min_val_acc']}: the test split was not read "
                  "and nothing was exported")
    missing = sorted(set(d.name for d in cfg.datasets) - set(outcome.selected) - set(below_bar))
    for dataset in missing:
        rows = table[(table.dataset == dataset)] if len(table) else table
        failed = rows[rows.status == "failed"] if len(rows) else rows
        if len(failed):
            print(f"{dataset:<16} no trial finished: {len(failed)} of {len(rows)} failed; first error: "
                  f"{failed.iloc[0]['error']} (full log: {failed.iloc[0]['log']})")
        else:
            print(f"{dataset:<16} no trial ran to max_t; raise num_samples or lower asha.reduction_factor")
    print()
    # name what was written: a dataset below its bar or without a winner has no export
    written = [f"{d}.yaml + {d}.safetensors" for d in outcome.selected] + ["results.parquet"]
    print(f"exported: {Path(outcome.export_dir).resolve()}/ ({', '.join(written)})")
    if outcome.tracking_gaps:
        print(f"warning: {outcome.tracking_gaps} MLflow call(s) could not be delivered; see the log above")
    uri = cfg.tracking.uri
    from orchestrator.hints import diffsweep_command, mlflow_command  # commands that work as printed
    ui = f"{mlflow_command()} ui --backend-store-uri {uri}" if not uri.startswith("http") else f"open {uri}"
    print(f"inspect:  {ui}   (experiment '{cfg.experiment}', parent run {outcome.parent_run_id})")
    for dataset, s in outcome.selected.items():
        print(f"try:      {diffsweep_command()} evaluate --config {s['yaml']} --split test")
        if s.get("model_uri"):
            print(f"serve:    {serve_command(uri, s['model_uri'])}")
    return 1 if missing else 0


def serve_command(tracking_uri: str, model_uri: str) -> str:
    """`mlflow models serve` for a winner, as it works when pasted: the server starts `uvicorn` from
    PATH, so when mlflow is not on PATH the command puts its folder first."""
    import shlex

    from orchestrator.hints import _short, mlflow_command

    env = f"MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} "
    mlflow = mlflow_command()
    if mlflow != "mlflow":  # .venv/bin/mlflow or python -m mlflow: the interpreter's bin folder first
        env = f"PATH={shlex.quote(_short(Path(sys.executable).parent))}:$PATH {env}"
    return (f"{env}{mlflow} models serve -m {model_uri} --env-manager local --host 127.0.0.1 --port 5001 "
            "--workers 1")


def sweep_status(name: str, storage_path: str, as_json: bool = False) -> str:
    from ray.tune import ExperimentAnalysis

    from orchestrator.config import ConfigError
    from orchestrator.select import error_line, error_log
    from orchestrator.tracking import trial_status
    from orchestrator.sweep import STATE_FILE, absolute

    path = Path(absolute(storage_path)) / name
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"sweep '{name}': nothing at {path}; check the name and --storage-path")
    max_t = json.loads((path / STATE_FILE).read_text())["config"].get("search", {}).get("asha", {}) or {}
    max_t = max_t.get("max_t", 8)
    analysis = ExperimentAnalysis(str(path))
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        df = analysis.trial_dataframes.get(trial.trial_id)
        best = float(df["val_acc"].max()) if df is not None and "val_acc" in df else None
        state = trial.status
        if state == "TERMINATED":  # Tune says terminated; ASHA-stopped and finished trials differ by epochs
            state = trial_status(int(last.get("epoch", 0)), max_t, errored=False).upper()
        error = None
        # the copy in the sweep's storage (trial.path): `trial.error_file` is the driver's staging
        # copy, whose path needs a live Ray session, and `diffsweep status` runs in a fresh shell
        log_file = error_log(trial.path) if trial.path else None
        if log_file is not None and log_file.is_file():
            error = error_line(log_file.read_text())
        rows.append({"trial_id": trial.trial_id, "state": state,
                     "config": {k: v for k, v in trial.config.items()}, "best_val_acc": best,
                     "last_val_acc": last.get("val_acc"), "epochs": last.get("epoch"), "error": error})
    if as_json:
        return json.dumps(rows, indent=1)
    def acc(v):
        return f"{v:.4f}" if v is not None else "-"

    lines = [f"{'trial':<14} {'state':<10} {'epochs':>6} {'best val_acc':>12} {'last val_acc':>12}  config"]
    for r in rows:
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        lines.append(f"{r['trial_id']:<14} {r['state']:<10} {r['epochs'] or 0:>6} {acc(r['best_val_acc']):>12} "
                     f"{acc(r['last_val_acc']):>12}  {cfg}")
        if r["error"]:
            lines.append(f"{'':<14} error: {r['error']}")
    return "\n".join(lines)
