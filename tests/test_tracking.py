"""MLflow tracking: child runs under the parent, statuses, and no lost metrics when the server blinks."""


import pytest
from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial

from orchestrator.tracking import MlflowTrialCallback, SweepRun, TrackingError, check_reachable


def trial(trial_id):
    return Trial("train_trial", config={"dataset": "digits", "head": "linear", "t": 10, "block": 4},
                 trial_id=trial_id, stub=True)


def sweep_callback(tmp_path, name: str):
    """A real sqlite store, the sweep's parent run in it, and the trial callback (max_t 3) logging there."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    parent = SweepRun(uri, name, name)
    return uri, parent, MlflowTrialCallback(uri, parent.experiment_id, parent.run_id, max_t=3)


def test_unreachable_server_is_refused_before_any_compute():
    with pytest.raises(TrackingError, match="unreachable"):
        check_reachable("http://127.0.0.1:9", timeout=2)


def test_metrics_survive_a_tracking_outage(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri, parent, cb = sweep_callback(tmp_path, "outage")
    a = trial("a1")
    cb.on_trial_start(0, [], a)
    cb.on_trial_result(0, [], a, {"epoch": 1, "val_acc": 0.5, "train_loss": 1.0})
    healthy = cb._client
    cb._client = MlflowClient("http://127.0.0.1:9")  # the server goes away (a real client, nothing listens)
    cb.on_trial_result(0, [], a, {"epoch": 2, "val_acc": 0.6, "train_loss": 0.8})
    cb.on_trial_result(0, [], a, {"epoch": 3, "val_acc": 0.7, "train_loss": 0.6})
    assert len(cb.backlog["a1"]) == 2 and cb.gaps == 2  # buffered, the sweep goes on
    cb._client = healthy  # it comes back: the next call replays the backlog in order
    cb.on_trial_complete(0, [], a)
    assert cb.gaps == 0
    client = MlflowClient(uri)
    run = client.get_run(cb.runs["a1"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3]
    assert run.data.tags["diffsweep.status"] == "completed" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id


def test_pruned_and_failed_statuses_and_no_duplicate_on_resume(tmp_path):
    uri, parent, cb = sweep_callback(tmp_path, "st")
    p, f = trial("p1"), trial("f1")
    for t in (p, f):
        cb.on_trial_start(0, [], t)
        cb.on_trial_result(0, [], t, {"epoch": 1, "val_acc": 0.4})
    cb.on_trial_complete(0, [], p)
    cb.on_trial_error(0, [], f)
    # a new driver (resume) finds the trial's own run instead of making another
    again = MlflowTrialCallback(uri, parent.experiment_id, parent.run_id, max_t=3)
    again.on_trial_start(0, [], p)
    assert again.runs["p1"] == cb.runs["p1"]
    client = MlflowClient(uri)
    tags = {r.data.tags["diffsweep.trial_id"]: r.data.tags["diffsweep.status"]
            for r in client.search_runs([parent.experiment_id]) if "diffsweep.trial_id" in r.data.tags}
    assert tags == {"p1": "pruned", "f1": "failed"}


def test_outage_at_a_trials_start_makes_one_run_and_loses_no_epoch(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri, parent, cb = sweep_callback(tmp_path, "start")
    healthy = cb.client
    cb._client = MlflowClient("http://127.0.0.1:9")  # down before the trial starts (nothing listens there)
    a = trial("s1")
    cb.on_trial_start(0, [], a)
    cb.on_trial_result(0, [], a, {"epoch": 1, "val_acc": 0.5, "timestamp": 100})
    cb.on_trial_result(0, [], a, {"epoch": 2, "val_acc": 0.6, "timestamp": 101})
    assert "s1" not in cb.runs and cb.gaps == 2  # no run yet; its calls wait in order
    cb._client = healthy
    cb.on_trial_result(0, [], a, {"epoch": 3, "val_acc": 0.7, "timestamp": 102})
    cb.on_trial_complete(0, [], a)
    assert cb.gaps == 0
    kids = [r for r in healthy.search_runs([parent.experiment_id]) if r.data.tags.get("diffsweep.trial_id") == "s1"]
    assert len(kids) == 1  # created once, though two events came while it could not be
    history = healthy.get_metric_history(kids[0].info.run_id, "val_acc")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert kids[0].data.params["head"] == "linear" and kids[0].data.tags["diffsweep.status"] == "completed"


def test_a_trial_the_resumed_sweep_no_longer_has_is_closed_as_abandoned(tmp_path):
    """A driver killed between a trial's start and Tune's next snapshot: resume never sees that trial."""
    uri, parent, first = sweep_callback(tmp_path, "orphan")
    kept, lost, ended = trial("k1"), trial("l1"), trial("e1")
    for t in (kept, lost, ended):
        first.on_trial_start(0, [], t)  # the first driver made these runs, then died
    first.on_trial_result(0, [], ended, {"epoch": 1, "val_acc": 0.2})  # pruned before the driver died
    first.on_trial_complete(0, [], ended)
    resumed = MlflowTrialCallback(uri, parent.experiment_id, parent.run_id, max_t=3)
    resumed.on_trial_start(0, [], kept)
    resumed.on_trial_result(0, [], kept, {"epoch": 3, "val_acc": 0.5})
    resumed.on_trial_complete(0, [], kept)
    resumed.on_experiment_end([kept])
    client = MlflowClient(uri)
    runs = {r.data.tags["diffsweep.trial_id"]: r for r in client.search_runs([parent.experiment_id])
            if "diffsweep.trial_id" in r.data.tags}
    assert runs["l1"].info.status == "KILLED" and runs["l1"].data.tags["diffsweep.status"] == "abandoned"
    # ended before the kill but unknown to the resume (seen in a driver-kill run): abandoned, still FINISHED
    assert runs["e1"].info.status == "FINISHED" and runs["e1"].data.tags["diffsweep.status"] == "abandoned"
    assert runs["k1"].info.status == "FINISHED" and runs["k1"].data.tags["diffsweep.status"] == "completed"


def test_a_restored_tuner_pickle_brings_back_the_resuming_drivers_callback(tmp_path):
    """Tuner.restore unpickles the first run's callback from tuner.pkl; it must become the new one."""
    from ray import cloudpickle

    from orchestrator.tracking import restoring_into

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    first = MlflowTrialCallback(uri, "1", "parent-run", max_t=3, on_done=lambda *a: None)
    blob = cloudpickle.dumps(first)  # what the first driver wrote
    resumed = MlflowTrialCallback(uri, "1", "parent-run", max_t=3)
    with restoring_into(resumed):
        assert cloudpickle.loads(blob) is resumed
    other = cloudpickle.loads(blob)  # outside a restore: a plain copy (no closure, no client pickled)
    assert other is not resumed and other.parent_run_id == "parent-run" and other.on_done is None


def test_a_refused_call_is_dropped_and_counted_not_retried_forever(tmp_path):
    """A 4xx answer (here: a param logged again with another value) is not an outage: the call is
    dropped and counted, and the trial's later calls still go out."""
    from mlflow.entities import Param

    uri, parent, cb = sweep_callback(tmp_path, "refused")
    a = trial("r1")
    cb.on_trial_start(0, [], a)
    cb._send(a, "log_batch", params=[Param("head", "mlp")])  # the run already has head=linear
    cb.on_trial_result(0, [], a, {"epoch": 1, "val_acc": 0.5, "timestamp": 100})
    assert cb.backlog["r1"] == [] and cb.refused == 1 and cb.gaps == 1
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(cb.runs["r1"], "val_acc")] == [1]


def test_the_http_bound_holds_inside_the_callbacks_calls_only(monkeypatch):
    import os

    from orchestrator.tracking import bounded_http

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a value the user set wins
    with bounded_http():
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ  # the parent run's calls keep MLflow's defaults
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
