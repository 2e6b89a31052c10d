"""Selection: the best completed trial per dataset wins on validation, and the test split is read only
after that choice is made. Real Ray Tune, real MLflow, real Optuna, real data (no mocks)."""

import re

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.tune import Result

from orchestrator.select import results_table, select_best, select_top

MAX_T = 3
SPACE_BLOCKS = (4, 8)  # tests/spaces.py tiny_space
# a stored part: t<T>_b<BLOCK>[_p<POOL>]_<digest>.part-<i>-of-<n>.arrow (trials/store.py FeatureKey.stem)
STORED = re.compile(r"t(?P<t>\d+)_b(?P<block>\d+)(?:_p(?P<pool>\d+))?_[0-9a-f]+\.part-\d+-of-\d+\.arrow")



def result(trial_id, dataset, val_accs, error=None, head="linear", t=10, block=4, pool=1, head_params=100):
    """A real `ray.tune.Result` as Tune builds one for a finished trial: last metrics plus the
    per-epoch history (one row per `tune.report`)."""
    config = {"dataset": dataset, "head": head, "t": t, "block": block, "pool": pool, "linear.lr": 0.01}
    history = pd.DataFrame({"epoch": range(1, len(val_accs) + 1), "val_acc": val_accs})
    metrics = {"trial_id": trial_id, "epoch": len(val_accs), "val_acc": val_accs[-1], "head_params": head_params,
               "config": config}
    return Result(metrics=metrics, checkpoint=None, error=error, path=f"/nowhere/{trial_id}", metrics_dataframe=history)


def test_select_best_takes_the_best_completed_trial_and_never_a_pruned_or_failed_one():
    """The rule (select.py): among trials that ran to max_t without error, the highest *final*
    val_acc; ties to the smaller head, then the earlier trial. Here a pruned trial (stopped at epoch
    2) and a failed one (raised after reporting all 3 epochs) both score higher than every completed
    trial, and a completed trial whose best epoch beats its final epoch must be judged on its final."""
    grid = [
        result("a1", "digits", [0.50, 0.60, 0.70]),
        result("a2", "digits", [0.60, 0.99], t=200),                                  # pruned by ASHA
        result("a3", "digits", [0.70, 0.80, 0.95], error=RuntimeError("boom"), block=8),  # failed
        result("a4", "digits", [0.60, 0.90, 0.72], pool=2),            # best epoch 0.90, final 0.72: wins
        result("a5", "digits", [0.72, 0.72, 0.72], head_params=500),  # ties a4 on final, larger head
        result("b1", "fashion_mnist", [0.80, 0.85, 0.86], head_params=300),
        result("b2", "fashion_mnist", [0.80, 0.85, 0.86], head_params=300, block=8),  # full tie: earlier wins
        result("b3", "fashion_mnist", [0.97], t=200),                  # pruned after its first rung
        result("c1", "cub", [0.10, 0.20], error=RuntimeError("oom")),  # a dataset with nothing completed
    ]
    table = results_table(grid, MAX_T)
    assert dict(zip(table.trial_id, table.status)) == {
        "a1": "completed", "a2": "pruned", "a3": "failed", "a4": "completed", "a5": "completed",
        "b1": "completed", "b2": "completed", "b3": "pruned", "c1": "failed"}
    chosen = select_best(table)
    assert sorted(chosen) == ["digits", "fashion_mnist"]  # cub has no completed trial: no winner
    assert chosen["digits"]["trial_id"] == "a4" and chosen["digits"]["val_acc"] == 0.72
    assert chosen["fashion_mnist"]["trial_id"] == "b1"
    # the higher-scoring pruned / failed trials really are the best of their datasets by value
    assert table.loc[table.dataset == "digits", "val_acc"].max() == 0.99
    assert table.loc[table.dataset == "fashion_mnist", "val_acc"].max() == 0.97


def test_select_top_ranks_completed_trials_as_select_best_does():
    """`selection.ensemble: k` candidates: the k best completed trials per dataset, in select_best's
    order (final val_acc, then the smaller head, then the earlier trial); pruned and failed never."""
    grid = [
        result("a1", "digits", [0.5, 0.6, 0.70]),
        result("a2", "digits", [0.6, 0.99], t=200),                                  # pruned
        result("a3", "digits", [0.7, 0.8, 0.95], error=RuntimeError("boom")),      # failed
        result("a4", "digits", [0.6, 0.9, 0.72], pool=2, head_params=200),
        result("a5", "digits", [0.72, 0.72, 0.72], head_params=100),               # ties a4, smaller: first
        result("a6", "digits", [0.5, 0.5, 0.65]),
        result("b1", "fashion_mnist", [0.8, 0.85, 0.86]),
    ]
    table = results_table(grid, MAX_T)
    top = select_top(table, 3)
    assert list(top["digits"]["trial_id"]) == ["a5", "a4", "a1"]
    assert list(top["fashion_mnist"]["trial_id"]) == ["b1"]  # fewer completed than k: all of them
    assert select_best(table)["digits"]["trial_id"] == top["digits"].iloc[0]["trial_id"]
    assert "_order" not in top["digits"].columns


def test_the_val_acc_heatmap_has_the_single_map_trials_only():
    """A concat trial reads blocks 4 and 8 at once: it belongs to neither cell, so the heatmap's (10, 4)
    cell is the best single-map trial there, not the concat trial listed under its first map."""
    from orchestrator.plots import accuracy_grid

    rows = pd.DataFrame({"head": ["concat", "linear", "mlp"], "t": [10, 10, 10], "block": [4, 4, 8],
                         "val_acc": [0.95, 0.80, 0.85]})
    grid = accuracy_grid(rows)
    assert grid.loc[10, 4] == 0.80 and grid.loc[10, 8] == 0.85
    assert accuracy_grid(rows[rows["head"] == "concat"]).empty


@pytest.fixture(scope="module")
def sweep(shared_sweep):
    """The suite's shared sweep (tests/conftest.py): `diffsweep.run` from an empty store."""
    return shared_sweep.folder, shared_sweep.selected, shared_sweep.started_ns, shared_sweep.datasets


def _children(tmp):
    client = MlflowClient(f"sqlite:///{tmp / 'mlruns.db'}")
    exp = client.get_experiment_by_name("shared")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("diffsweep.role") == "parent")
    return client, parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


@pytest.mark.slow
def test_a_real_sweep_selects_the_best_completed_trial(sweep):
    """Recomputed independently of select.py, from the MLflow store the sweep wrote: per dataset, the
    final-epoch val_acc of every child run tagged completed; the winner must hold the maximum, be one
    of the trials holding it, and be the trial the exported YAML names."""
    tmp, selected, _, datasets = sweep
    client, _, children = _children(tmp)
    assert len(children) == 6 * len(datasets)
    best: dict[str, float] = {}
    holders: dict[str, set] = {}
    for r in children:
        if r.data.tags["diffsweep.status"] != "completed":
            continue
        history = client.get_metric_history(r.info.run_id, "val_acc")
        final = max(history, key=lambda m: m.step)
        assert final.step == MAX_T
        d = r.data.params["dataset"]
        key = (r.data.params["head"], int(r.data.params["t"]), int(r.data.params["block"]),
               int(r.data.params["pool"]) if "pool" in r.data.params else None)
        if final.value > best.get(d, -1):
            best[d], holders[d] = final.value, {key}
        elif final.value == best[d]:
            holders[d].add(key)
    assert sorted(selected) == sorted(best) == sorted(datasets)
    for d, won in selected.items():
        assert won["val_acc"] == pytest.approx(best[d], abs=1e-9)
        assert (won["head"], won["t"], won["block"], won["pool"]) in holders[d]
        doc = yaml.safe_load(open(won["yaml"]))
        winner_run = client.get_run(doc["mlflow"]["run_id"])
        assert winner_run.data.tags["diffsweep.status"] == "completed"
        assert winner_run.data.metrics["val_acc"] == pytest.approx(best[d], abs=1e-9)


@pytest.mark.slow
def test_no_test_split_feature_exists_before_the_selection(sweep):
    """The store starts empty and a feature can only be read once its file has its final name (parts
    are written to a temporary name and renamed, and never rewritten). So a test-split file whose
    last write (mtime, which rename keeps and which precedes the rename) is later than the end of
    every trial (each child run's MLflow end_time, set by the driver when Tune reports the trial
    done) could not have been read by any trial. Every test-split file must be: (1) made after the
    last trial ended, i.e. after the results select_best decides on were final; (2) one the winner
    needs: its t (one U-Net pass makes every space block of that t at once) and, for a pooled head,
    the pooled caches of its (t, block) only. (2) is the part that shows the test read depends on the
    choice. File access times are not used (noatime/relatime make them unreliable). The kernel stamps
    mtimes from a coarse clock (a few ms behind time.time()); between the last trial's end and the
    first test write the driver builds the results table, plots and logs heatmaps and launches an
    extraction, far more than that."""
    tmp, selected, before, _ = sweep
    _, _, children = _children(tmp)
    last_trial_end_ns = max(r.info.end_time for r in children) * 1_000_000
    assert all(r.info.end_time for r in children)
    store = tmp / "features"
    for d, won in selected.items():
        val_files = [p for p in (store / d / "val").rglob("*") if p.is_file()]
        test_files = [p for p in (store / d / "test").rglob("*") if p.is_file()]
        assert val_files and test_files
        # a control: the val features the trials read were made before the last trial ended, so the
        # comparison below tells a file made for the trials from one made after them
        assert max(p.stat().st_mtime_ns for p in val_files) < last_trial_end_ns
        for p in test_files:
            assert before < last_trial_end_ns <= p.stat().st_mtime_ns, p  # ms end_time: <= at the same ms
        keys = [STORED.fullmatch(p.name) for p in test_files]
        assert all(keys), [p.name for p in test_files]
        maps = {(int(k["t"]), int(k["block"])) for k in keys if k["pool"] is None}
        pooled = {(int(k["t"]), int(k["block"])) for k in keys if k["pool"] is not None}
        assert (won["t"], won["block"]) in maps
        assert {t for t, _ in maps} == {won["t"]} and {b for _, b in maps} <= set(SPACE_BLOCKS), maps
        assert pooled == ({(won["t"], won["block"])} if won["pool"] is not None else set()), pooled
