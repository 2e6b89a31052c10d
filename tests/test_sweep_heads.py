"""Sweeps of every head type, and of the mixing head with noise ensembles, each its own tiny sweep."""

import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from tests.spaces import tiny_space

pytestmark = pytest.mark.slow


def test_every_head_type_runs_to_completion_and_the_best_three_export_as_one(ray_local, tmp_path, shared_features,
                                                                             mlflow_template, capsys):
    """Every head type completes. With `selection.ensemble: 3` the three best (here reading different
    maps: concat and fusion read two) are scored together on validation (mean probability); the sweep exports
    them as one head only when that beats its best single trial there, reads the test split once for
    the selection, and the export (`diffsweep evaluate`, the Python API, the MLflow run) gives the
    accuracies it recorded."""
    import yaml

    from diffsweep import load

    heads = {"linear": {}, "mlp": {"hidden": [32]}, "concat": {"hidden": [32]},
             "cnn": {"width": [16], "depth": [1]}, "attention": {"dim": [32], "heads": [4], "depth": [1]},
             "fusion": {"dim": [32], "heads": [4], "depth": [1]}}
    space = tiny_space(tmp_path, name="heads", heads=heads, sampler="grid", store=shared_features,
                       datasets=[{"name": "digits", "val_fraction": 0.15, "limit": {"train": 400}}],
                       asha={"max_t": 2, "grace_period": 2, "reduction_factor": 2}, mlflow_template=mlflow_template)
    spec = yaml.safe_load(space.read_text())
    two_maps = [[[10, 4], [10, 8]]]
    spec["space"].update(t=[10], block=[8], pool=[2], concat_maps=two_maps, fusion_maps=two_maps)
    spec["selection"] = {"ensemble": 3}
    space.write_text(yaml.safe_dump(spec))
    assert main(["run", str(space)]) == 0
    printed = capsys.readouterr().out
    table = pd.read_parquet(tmp_path / "exported" / "results.parquet")
    assert sorted(table["head"]) == sorted(heads)
    assert (table["status"] == "completed").all() and (table["head_params"] > 0).all()

    top3 = table.sort_values(["val_acc", "head_params"], ascending=[False, True], kind="stable").iloc[:3]
    exported = tmp_path / "exported" / "digits.yaml"
    doc = yaml.safe_load(exported.read_text())
    # this seeded sweep's three best beat its best single trial on validation (the sweep prints both)
    line = next(x for x in printed.splitlines() if "ensemble of the 3 best trials" in x)
    assert doc["head"]["type"] == "ensemble", line
    members = doc["head"]["members"]
    assert [m["type"] for m in members] == list(top3["head"])
    assert doc["selection"]["val_acc"] > top3["val_acc"].max() and doc["selection"]["members"] == 3
    assert sorted(map(tuple, doc["features"]["maps"])) == sorted({tuple(x) for m in members for x in m["maps"]})
    assert f"exported: {exported.parent.resolve()}/ (digits.yaml + digits.safetensors, results.parquet)" in printed
    capsys.readouterr()
    assert main(["evaluate", "--config", str(exported), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(doc["selection"]["test_acc"], abs=1e-6)
    assert load(exported).evaluate("val")["accuracy"] == pytest.approx(doc["selection"]["val_acc"], abs=1e-6)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("heads").experiment_id])
                  if r.data.tags.get("diffsweep.role") == "parent")
    assert parent.data.metrics["digits.test_acc"] == pytest.approx(doc["selection"]["test_acc"])
    assert len(json.loads(parent.data.tags["diffsweep.winner.digits"])) == 3


def test_mixing_head_sweep_logs_its_weight_heatmaps_and_a_selection_below_the_bar_is_not_tested(
        ray_local, tmp_path, shared_features, mlflow_template, capsys):
    """A mixing head over every (t, block) of the space, beside single-map linear trials: the trial's
    child run gets its learned weights as a heatmap, the parent gets the best one with its rank
    correlation against the val_acc heatmap. (Two noise draws: the next test.) The sweep also sets a
    `selection.min_val_acc` its selection does not reach: it is reported with its val_acc, the test
    split is not read for it and nothing is exported or logged as a model."""
    heads = {"linear": {}, "mixing": {"dim": [16], "side": [4]}}
    space = tiny_space(tmp_path, name="mixing", heads=heads, sampler="grid", store=shared_features,
                       datasets=[{"name": "digits", "val_fraction": 0.15, "limit": {"train": 400}}],
                       asha={"max_t": 2, "grace_period": 2, "reduction_factor": 2}, mlflow_template=mlflow_template)
    import yaml
    spec = yaml.safe_load(space.read_text())
    spec["space"].update(pool=[1])
    spec["selection"] = {"min_val_acc": {"digits": 1.0}}
    space.write_text(yaml.safe_dump(spec))
    assert main(["run", str(space)]) == 0
    out = capsys.readouterr().out
    table = pd.read_parquet(tmp_path / "exported" / "results.parquet")
    assert sorted(table["head"]) == ["linear"] * 4 + ["mixing"]
    assert (table["status"] == "completed").all()
    weights = json.loads(table[table["head"] == "mixing"].iloc[0]["map_weights"])
    assert sorted((t, b) for t, b, _ in weights) == [(10, 4), (10, 8), (200, 4), (200, 8)]
    assert abs(sum(w for *_, w in weights) - 1) < 1e-4
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mixing").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("diffsweep.role") == "parent")
    children = [r for r in runs if r.data.params.get("head") == "mixing"]
    assert len(children) == 1
    for child in children:
        assert [a.path for a in client.list_artifacts(child.info.run_id, "heatmaps")] == \
            ["heatmaps/mixing_weights.json", "heatmaps/mixing_weights.png"]
    parent_heatmaps = [a.path for a in client.list_artifacts(parent.info.run_id, "heatmaps")]
    assert "heatmaps/digits_mixing_weights.png" in parent_heatmaps
    assert -1 <= parent.data.metrics["digits.mixing_rank_corr"] <= 1
    assert (tmp_path / "exported" / "digits_mixing_weights.png").is_file()
    # below the bar: val_acc reported, test never read, nothing exported
    assert parent.data.metrics["digits.val_acc"] == pytest.approx(table["val_acc"].max())
    assert parent.data.metrics["digits.val_acc"] < 1.0
    assert "digits.test_acc" not in parent.data.metrics and "diffsweep.winner.digits" not in parent.data.tags
    assert json.loads(parent.data.tags["diffsweep.below_min_val_acc.digits"])["min_val_acc"] == 1.0
    assert "val_acc below selection.min_val_acc 1.0: the test split was not read" in out
    assert not list((tmp_path / "exported").glob("digits.*"))  # no yaml, no weights
    assert f"exported: {(tmp_path / 'exported').resolve()}/ (results.parquet)" in out  # and says so
    assert not {"digits", "exported"} & {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_a_mixing_winner_of_two_noise_draws_on_bf16_features_evaluates_to_its_own_accuracy(ray_local, tmp_path,
                                                                                            mlflow_template, capsys):
    """The export of a mixing head (attention classifier) on k=2 features made with `store.numeric:
    cpu-bf16` rebuilds the same head from its YAML (its (t, block) labels, hence its per-block
    bottlenecks) and the same features (k draws, bf16 arithmetic): `diffsweep evaluate` gives the test
    accuracy the sweep reported."""
    heads = {"mixing": {"dim": [16], "side": [4], "classifier": ["attention"]}}
    space = tiny_space(tmp_path, name="mixing-export", heads=heads, sampler="grid",
                       datasets=[{"name": "digits", "val_fraction": 0.15, "limit": {"train": 300, "test": 200}}],
                       asha={"max_t": 1, "grace_period": 1, "reduction_factor": 2}, mlflow_template=mlflow_template)
    import yaml
    spec = yaml.safe_load(space.read_text())
    spec["space"].update(pool=[1], noise_draws=[2])
    spec["store"]["numeric"] = "cpu-bf16"
    space.write_text(yaml.safe_dump(spec))
    assert main(["run", str(space)]) == 0
    exported = tmp_path / "exported" / "digits.yaml"
    doc = yaml.safe_load(exported.read_text())
    assert doc["head"]["type"] == "mixing" and doc["head"]["hparams"]["classifier"] == "attention"
    assert doc["features"]["noise_draws"] == 2 and len(doc["features"]["maps"]) == 4
    assert doc["features"]["numeric"] == "cpu-bf16"
    stems = [p.name for p in (tmp_path / "features").rglob("*.arrow")]
    assert stems and all("_k2_" in n for n in stems)  # k is in the key (k=1 keys keep their names: test_store)
    capsys.readouterr()
    assert main(["evaluate", "--config", str(exported), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == doc["selection"]["test_n"] <= 200  # the limit (kept per class)
    assert result["accuracy"] == pytest.approx(doc["selection"]["test_acc"], abs=1e-6)
