"""Small sweep specs for the tests, written into a temporary folder with absolute paths."""

import os
import shutil
from pathlib import Path

import yaml

# a sweep's `resources` so its extraction tasks run one at a time in one worker (see tiny_space); never
# more CPUs than a CLI driver's Ray has (os.cpu_count()): a task must fit
SERIAL_EXTRACTION = {"extract_cpu": min(2, os.cpu_count() or 1)}


def tiny_space(tmp: Path, name: str = "tiny", datasets=None, heads=None, store: Path | None = None,
               serial_extraction: bool = True, mlflow_template: Path | None = None, **search) -> Path:
    """`store`: a feature store to use (conftest's `shared_features`) instead of tmp/features.
    `mlflow_template`: conftest's empty MLflow store, copied to tmp/mlruns.db (without it the sweep's
    first MLflow call creates the store, as a user's does; the bad-input tests check it never does).
    `serial_extraction`: each extraction task asks for two CPUs (`resources.extract_cpu`), so on the
    suite's two-CPU Rays one worker process runs a sweep's part tasks one after another instead of two
    processes each importing torch and loading the U-Net (a one-trial CLI sweep: 33.3 -> 24.3 CPU-s).
    False: the default resources, as users run a sweep (the cluster tests: part tasks spread over nodes)."""
    spec = {
        "name": name,
        "seed": 0,
        "datasets": datasets or [{"name": "digits", "val_fraction": 0.15}],
        "space": {"t": [10, 200], "block": [4, 8], "pool": [1, 2],
                  "head": heads or {"linear": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}},
                                    "mlp": {"hidden": [32, 64]}}},
        # one trial at a time unless a test is about concurrency: the suite keeps every core busy anyway,
        # and a second concurrent trial costs its own worker process (and often an extraction one):
        # measured on a 2-trial sweep, 31.3 CPU-s with two at a time, 26.1 with one
        "search": {"sampler": "tpe", "num_samples": 6, "max_concurrent": 1,
                   "asha": {"max_t": 3, "grace_period": 1, "reduction_factor": 3}, **search},
        "training": {"recipe": "adamw", "batch_size": 64},
        "store": {"path": str(store or tmp / "features"), "batch_size": 128},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlruns.db'}"},
        "storage_path": str(tmp / "ray"),
        "export_dir": str(tmp / "exported"),
    }
    if serial_extraction:
        spec["resources"] = dict(SERIAL_EXTRACTION)
    if mlflow_template is not None:
        shutil.copyfile(mlflow_template, tmp / "mlruns.db")
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
