"""Class-conditional ADM checkpoints (64x64_diffusion.pt, 128x128_diffusion.pt): a sweep needs
`checkpoint.class_label`, which is part of the feature key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from fgvc_fixtures import jpeg
from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.sweep import trial_setup
from tests.spaces import SERIAL_EXTRACTION
from trials.unet import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]


# adm-64-cond's own flags (class-conditional, its attention and up/down blocks), narrower and with one
# res block per level: the same code path as the 296 M-parameter model at a fraction of its CPU time
NARROW_64_COND = {**ARCHITECTURES["adm-64-cond"], "num_channels": 64, "num_res_blocks": 1}


def cond_space(tmp_path: Path, class_label=None, arch="adm-64-cond") -> Path:
    root = tmp_path / "folders"
    for split, per_class in (("train", 10), ("val", 3)):
        for c in range(3):
            for i in range(per_class):
                jpeg(root / split / f"class{c}" / f"{split}{c}_{i}.jpg", seed=100 * c + i, size=(48, 40))
    checkpoint = {"arch": arch, "random_weights": True}
    if class_label is not None:
        checkpoint["class_label"] = class_label
    spec = {"name": "cond", "seed": 0, "checkpoint": checkpoint,
            "datasets": [{"name": "imagefolder", "root": str(root), "val_fraction": 0.2}],
            "space": {"t": [50], "block": [2, 3], "pool": [1], "head": {"linear": {"lr": [0.01]}}},
            "search": {"sampler": "grid", "max_concurrent": 1, "asha": {"max_t": 1, "grace_period": 1}},
            "training": {"recipe": "adamw", "batch_size": 8},
            "resources": dict(SERIAL_EXTRACTION),  # one extraction process
            "store": {"path": str(tmp_path / "features"), "batch_size": 8},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns.db'}"},
            "storage_path": str(tmp_path / "ray"), "export_dir": str(tmp_path / "exported")}
    path = tmp_path / "cond.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_conditional_model_without_class_label_is_refused_in_one_line(tmp_path):
    space = cond_space(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(space)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint.class_label" in lines[0] and "class-conditional" in lines[0]
    assert not (tmp_path / "features").exists() and not (tmp_path / "ray").exists()


def test_class_label_is_part_of_the_feature_key(tmp_path):
    keys = set()
    for label in (0, 7, "mean"):
        cfg = load_config(cond_space(tmp_path / str(label), class_label=label))
        key = trial_setup(cfg).request("imagefolder", "train", 50).key(50, 2)
        assert key.class_label == str(label)
        keys.add(key.digest.split("_")[-1])
    assert len(keys) == 3


@pytest.mark.slow
def test_conditional_sweep_runs_with_a_class_label(ray_local, tmp_path):
    space = cond_space(tmp_path, class_label="mean", arch=NARROW_64_COND)
    assert main(["run", str(space)]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cond").experiment_id])
    children = [r for r in runs if r.data.tags.get("diffsweep.role") != "parent"]
    assert len(children) == 2 and all(r.data.tags["diffsweep.status"] == "completed" for r in children)
    exported = yaml.safe_load((tmp_path / "exported" / "imagefolder.yaml").read_text())
    assert exported["checkpoint"]["class_label"] == "mean"
