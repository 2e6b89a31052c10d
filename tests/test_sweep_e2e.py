"""The main job end to end on real data, with real Ray, real MLflow and real Optuna (no mocks)."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.cli import main
from tests.conftest import fashion_mnist_available
from tests.spaces import tiny_space

# one worker runs the whole module under xdist, so its module-scoped sweep is made once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sweep_e2e")]


@pytest.fixture(scope="module")
def sweep(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    datasets = [{"name": "digits", "val_fraction": 0.15, "limit": {"train": 800}}]
    if fashion_mnist_available():
        datasets.append({"name": "fashion_mnist", "limit": {"train": 400, "val": 150, "test": 200}})
    space = tiny_space(tmp, datasets=datasets)
    assert main(["run", str(space)]) == 0
    return tmp, space, [d["name"] for d in datasets]


def test_mlflow_has_parent_and_one_child_per_trial(sweep):
    tmp, _, datasets = sweep
    client = MlflowClient(f"sqlite:///{tmp / 'mlruns.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("diffsweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 6 * len(datasets)
    statuses = {r.data.tags["diffsweep.status"] for r in children}
    assert statuses <= {"completed", "pruned", "failed"} and "completed" in statuses
    assert "pruned" in statuses  # ASHA stopped some trials early
    for r in children:
        history = client.get_metric_history(r.info.run_id, "val_acc")
        epochs = sorted(m.step for m in history)
        assert epochs == list(range(1, len(epochs) + 1))  # one val_acc per epoch, step = epoch
        assert (len(epochs) == 3) == (r.data.tags["diffsweep.status"] == "completed")
    for d in datasets:
        assert f"{d}.test_acc" in parents[0].data.metrics
    artifacts = [a.path for a in client.list_artifacts(parents[0].info.run_id)]
    assert "results.parquet" in artifacts and "heatmaps" in artifacts


def test_optuna_studies_per_dataset_record_pruned_trials(sweep):
    tmp, space, datasets = sweep
    import glob
    import pickle
    # the searcher's own checkpoint holds the studies (in-memory storage)
    ckpt = sorted(glob.glob(str(tmp / "ray" / "tiny" / "searcher-state-*.pkl")))
    assert ckpt, "Tune saved no searcher state"
    state = pickle.load(open(ckpt[-1], "rb"))
    studies = state["studies"] if "studies" in state else state["searcher"].studies
    assert sorted(studies) == sorted(datasets)
    for study in studies.values():
        states = [t.state.name for t in study.trials]
        assert len(states) == 6 and "RUNNING" not in states
        assert "PRUNED" in states and "COMPLETE" in states
        for t in study.trials:
            if t.state.name == "PRUNED":
                assert t.intermediate_values and max(t.intermediate_values) < 3
            if t.state.name == "COMPLETE":
                assert max(t.intermediate_values) == 3


def test_export_evaluate_and_predict(sweep, tmp_path):
    tmp, _, datasets = sweep
    exported = tmp / "exported"
    table = pd.read_parquet(exported / "results.parquet")
    assert {"head_params", "val_acc", "status", "t", "block", "head"} <= set(table.columns)
    for d in datasets:
        assert (exported / f"{d}.yaml").is_file() and (exported / f"{d}.safetensors").is_file()
    import yaml
    doc = yaml.safe_load((exported / "digits.yaml").read_text())
    assert doc["selection"]["chosen_on"] == "validation"
    out = subprocess.run([sys.executable, "-m", "orchestrator", "evaluate", "--config", str(exported / "digits.yaml"),
                          "--split", "test"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["n"] == doc["selection"]["test_n"]
    assert result["accuracy"] == pytest.approx(doc["selection"]["test_acc"], abs=1e-6)
    image = tmp_path / "digit.png"
    Image.fromarray((np.eye(8) * 255).astype(np.uint8)).save(image)
    out = subprocess.run([sys.executable, "-m", "orchestrator", "predict", "--config", str(exported / "digits.yaml"),
                          str(image)], capture_output=True, text=True, check=True)
    path, label = out.stdout.strip().split("\t")
    assert path == str(image) and label in doc["dataset"]["classes"]
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    out = subprocess.run([sys.executable, "-m", "orchestrator", "predict", "--config", str(exported / "digits.yaml"),
                          str(bogus)], capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "cannot be decoded" in out.stderr


def test_status_lists_trials(sweep, capsys):
    tmp, _, datasets = sweep
    assert main(["status", "tiny", "--storage-path", str(tmp / "ray"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 6 * len(datasets)
    assert {r["state"] for r in rows} <= {"COMPLETED", "PRUNED", "ERROR"}


def test_every_head_type_runs_to_completion(ray_local, tmp_path):
    heads = {"linear": {}, "mlp": {"hidden": [32]}, "cnn": {"width": [16], "depth": [1]},
             "attention": {"dim": [32], "heads": [4], "depth": [1]}, "fusion": {"dim": [32], "heads": [4], "depth": [1]}}
    space = tiny_space(tmp_path, name="heads", heads=heads, sampler="grid",
                       datasets=[{"name": "digits", "val_fraction": 0.15, "limit": {"train": 500}}],
                       asha={"max_t": 2, "grace_period": 2, "reduction_factor": 2})
    import yaml
    spec = yaml.safe_load(space.read_text())
    spec["space"].update(t=[10], block=[8], pool=[2], fusion_maps=[[[10, 4], [10, 8]]])
    space.write_text(yaml.safe_dump(spec))
    assert main(["run", str(space)]) == 0
    table = pd.read_parquet(tmp_path / "exported" / "results.parquet")
    assert sorted(table["head"]) == sorted(heads)
    assert (table["status"] == "completed").all() and (table["head_params"] > 0).all()


def test_mixing_head_and_noise_ensembles_sweep_logs_its_weight_heatmaps(ray_local, tmp_path):
    """A mixing head over every (t, block) of the space, beside single-map linear trials, on features
    of one and of two noise draws: the trial's child run gets its learned weights as a heatmap, the
    parent gets the best one with its rank correlation against the val_acc heatmap."""
    heads = {"linear": {}, "mixing": {"dim": [16], "side": [4]}}
    space = tiny_space(tmp_path, name="mixing", heads=heads, sampler="grid",
                       datasets=[{"name": "digits", "val_fraction": 0.15, "limit": {"train": 400}}],
                       asha={"max_t": 2, "grace_period": 2, "reduction_factor": 2})
    import yaml
    spec = yaml.safe_load(space.read_text())
    spec["space"].update(pool=[1], noise_draws=[1, 2])
    space.write_text(yaml.safe_dump(spec))
    assert main(["run", str(space)]) == 0
    table = pd.read_parquet(tmp_path / "exported" / "results.parquet")
    assert sorted(table["head"]) == ["linear"] * 8 + ["mixing"] * 2
    assert (table["status"] == "completed").all()
    draws = [json.loads(h).get("noise_draws") for h in table["hparams"]]
    assert sorted(draws) == [1] * 5 + [2] * 5
    stems = [p.name for p in (tmp_path / "features").rglob("*.arrow")]
    assert any("_k2_" in n for n in stems) and any("_k2_" not in n for n in stems)  # k=1 keys keep their names
    weights = json.loads(table[table["head"] == "mixing"].iloc[0]["map_weights"])
    assert sorted((t, b) for t, b, _ in weights) == [(10, 4), (10, 8), (200, 4), (200, 8)]
    assert abs(sum(w for *_, w in weights) - 1) < 1e-4
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mixing").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("diffsweep.role") == "parent")
    children = [r for r in runs if r.data.params.get("head") == "mixing"]
    assert len(children) == 2
    for child in children:
        assert [a.path for a in client.list_artifacts(child.info.run_id, "heatmaps")] == \
            ["heatmaps/mixing_weights.json", "heatmaps/mixing_weights.png"]
    parent_heatmaps = [a.path for a in client.list_artifacts(parent.info.run_id, "heatmaps")]
    assert "heatmaps/digits_mixing_weights.png" in parent_heatmaps
    assert -1 <= parent.data.metrics["digits.mixing_rank_corr"] <= 1
    assert (tmp_path / "exported" / "digits_mixing_weights.png").is_file()
