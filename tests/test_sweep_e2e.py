"""The main job end to end on real data, with real Ray, real MLflow and real Optuna (no mocks)."""

import json

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.cli import main
from trials.trainable import EPOCH_FILE, WEIGHTS_FILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(shared_sweep):
    """The suite's shared sweep (tests/conftest.py): digits and, when installed, Fashion-MNIST."""
    return shared_sweep.folder, shared_sweep.space, shared_sweep.datasets


def test_mlflow_has_parent_and_one_child_per_trial(sweep):
    tmp, _, datasets = sweep
    client = MlflowClient(f"sqlite:///{tmp / 'mlruns.db'}")
    exp = client.get_experiment_by_name("shared")
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
    # Tune reused worker processes: at most two trials run at once, so fewer processes than trials
    pids = {r.data.tags["diffsweep.pid"] for r in children}
    assert len(pids) < len(children), pids


def test_only_each_trials_newest_checkpoint_keeps_its_weights(sweep):
    """training.checkpoints_to_keep (1): older checkpoint folders stay, for a resume whose saved state
    lags (tests/test_faults.py), but hold only their epoch."""
    tmp, _, _ = sweep
    trials = [d for d in (tmp / "ray" / "shared").iterdir() if d.name.startswith("train_trial")]
    assert trials
    for trial in trials:
        folders = sorted(trial.glob("checkpoint_*"))
        assert folders and all((f / EPOCH_FILE).is_file() for f in folders)
        assert [f.name for f in folders if (f / WEIGHTS_FILE).exists()] == [folders[-1].name]


def test_optuna_studies_per_dataset_record_pruned_trials(sweep):
    tmp, space, datasets = sweep
    import glob
    import pickle
    # the searcher's own checkpoint holds the studies (in-memory storage)
    ckpt = sorted(glob.glob(str(tmp / "ray" / "shared" / "searcher-state-*.pkl")))
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


def test_export_evaluate_and_predict(sweep, tmp_path, capsys):
    tmp, _, datasets = sweep
    exported = tmp / "exported"
    table = pd.read_parquet(exported / "results.parquet")
    assert {"head_params", "val_acc", "status", "t", "block", "head"} <= set(table.columns)
    for d in datasets:
        assert (exported / f"{d}.yaml").is_file() and (exported / f"{d}.safetensors").is_file()
    import yaml
    doc = yaml.safe_load((exported / "digits.yaml").read_text())
    assert doc["selection"]["chosen_on"] == "validation"
    # the console script's entry point, in this process (three more interpreters importing torch cost
    # more than the checks; tests/test_bad_input.py runs the console script itself)
    capsys.readouterr()
    assert main(["evaluate", "--config", str(exported / "digits.yaml"), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == doc["selection"]["test_n"]
    assert result["accuracy"] == pytest.approx(doc["selection"]["test_acc"], abs=1e-6)
    image = tmp_path / "digit.png"
    Image.fromarray((np.eye(8) * 255).astype(np.uint8)).save(image)
    assert main(["predict", "--config", str(exported / "digits.yaml"), str(image)]) == 0
    path, label = capsys.readouterr().out.strip().split("\t")
    assert path == str(image) and label in doc["dataset"]["classes"]
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    assert main(["predict", "--config", str(exported / "digits.yaml"), str(bogus)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot be decoded" in err


def test_status_lists_trials(sweep, capsys):
    tmp, _, datasets = sweep
    assert main(["status", "shared", "--storage-path", str(tmp / "ray"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 6 * len(datasets)
    assert {r["state"] for r in rows} <= {"COMPLETED", "PRUNED", "ERROR"}
