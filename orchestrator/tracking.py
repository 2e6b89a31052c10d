"""MLflow: experiment = sweep name, one parent run per sweep, one child run per trial.

The callback runs on the driver and uses explicit run ids (MlflowClient), never a global active run,
so many trials log at once without interfering. If the tracking server blinks mid-sweep the calls
are buffered and replayed; the sweep never dies for it, and any gap left is reported at the end.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

log = logging.getLogger("diffsweep")
STATUS_TAG = "diffsweep.status"
CHECKPOINT_TAG = "diffsweep.checkpoint_epoch"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by MLflow 3's UI to choose the experiment's view
EXPERIMENT_KIND = "custom_model_development"   # its training-runs view (the other is "genai_development")


class TrackingError(RuntimeError):
    pass


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any compute, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered: a server is there (some deployments have no /health)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it (see "
                            "cluster/mlflow-server.md) or pass --tracking-uri sqlite:///mlruns.db") from None


def trial_status(last_epoch: int, max_t: int, errored: bool) -> str:
    if errored:
        return "failed"
    return "completed" if last_epoch >= max_t else "pruned"


class SweepRun:
    """The sweep's parent run (created once, found again on resume)."""

    def __init__(self, uri: str, experiment: str, sweep: str, parent_run_id: str | None = None):
        self.uri = uri
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        # MLflow 3's UI opens an experiment without this tag in its GenAI view; ours holds training runs
        self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        if parent_run_id:
            self.run_id = parent_run_id
            self.client.update_run(parent_run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=sweep, tags={"diffsweep.sweep": sweep,
                                                                                     "diffsweep.role": "parent"})
            self.run_id = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_dataset_inputs(self, datasets: dict) -> None:
        """Every split of every dataset as a dataset input of the parent run (the UI's "Datasets")."""
        from orchestrator.mlflow_model import log_dataset_inputs
        from trials.features import dataset_splits

        for name, spec in datasets.items():
            classes, splits = dataset_splits(spec)
            log_dataset_inputs(self.client, self.run_id, name, splits, classes, spec.root)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class MlflowTrialCallback(Callback):
    """One child run per Tune trial: params = its config, per-epoch metrics at step=epoch, and the
    tag `diffsweep.status` in {completed, pruned, failed}. A resumed trial continues its own run."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, max_t: int,
                 on_done: Callable[[str, dict], None] | None = None):
        self.uri, self.experiment_id, self.parent_run_id, self.max_t = uri, experiment_id, parent_run_id, max_t
        self.runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self.last: dict[str, dict] = {}
        self.logged_epoch: dict[str, int] = {}  # the highest epoch whose metrics reached MLflow
        self.where: dict[str, dict] = {}
        self.backlog: list[tuple[str, tuple, dict]] = []
        self.lost_calls = 0
        self.on_done = on_done
        self._client: MlflowClient | None = None
        self._artifacts: str | None = None  # folder of files waiting to be (or already) logged

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    def _call(self, method: str, *args, **kwargs) -> Any:
        """Call MlflowClient, buffering the call if the server is down (replayed in order later)."""
        self.backlog.append((method, args, kwargs))
        result = None
        while self.backlog:
            m, a, kw = self.backlog[0]
            try:
                result = getattr(self.client, m)(*a, **kw)
            except Exception as e:  # noqa: BLE001 - any tracking failure must not kill the sweep
                log.warning("MLflow call %s failed (%s); buffered %d call(s)", m, str(e)[:120], len(self.backlog))
                return None
            self.backlog.pop(0)
        return result

    def _run_for(self, trial) -> str | None:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        try:  # a resumed sweep: find the trial's own run instead of making a duplicate
            found = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`diffsweep.trial_id` = '{trial.trial_id}' and "
                                                    f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'")
        except Exception:  # noqa: BLE001
            found = []
        if found:
            self.runs[trial.trial_id] = found[0].info.run_id
            self._call("update_run", found[0].info.run_id, status="RUNNING")
            return self.runs[trial.trial_id]
        c = trial.config
        name = f"{c.get('dataset')}-{c.get('head')}-t{c.get('t')}-b{c.get('block')}-{trial.trial_id}"
        run = self._call("create_run", self.experiment_id, run_name=name,
                         tags={"mlflow.parentRunId": self.parent_run_id, "diffsweep.trial_id": trial.trial_id,
                               "diffsweep.dataset": str(c.get("dataset")), STATUS_TAG: "running"})
        if run is None:
            return None
        self.runs[trial.trial_id] = run.info.run_id
        params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in c.items()]
        self._call("log_batch", run.info.run_id, params=params)
        return run.info.run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        self.last[trial.trial_id] = result
        if run_id is None:
            self.lost_calls += 1
            return
        step = int(result.get("epoch", 0))
        # A trial killed after reporting an epoch but before Tune registered that epoch's checkpoint
        # (a separate save round trip) restarts from the previous checkpoint and runs the epoch again,
        # with the same seed: its curve keeps the first value of each epoch.
        fresh = step > self.logged_epoch.get(trial.trial_id, 0)
        metrics = [Metric(k, float(result[k]), int(result.get("timestamp", 0)) * 1000, step)
                   for k in ("val_acc", "train_loss") if k in result and fresh]
        self.logged_epoch[trial.trial_id] = max(step, self.logged_epoch.get(trial.trial_id, 0))
        # where the trial runs now (it changes when a failed trial is restarted elsewhere)
        where = {f"diffsweep.{k}": str(result[k]) for k in ("hostname", "node_id", "pid") if k in result}
        tags = [RunTag(k, v) for k, v in where.items()] if where != self.where.get(trial.trial_id) else []
        self.where[trial.trial_id] = where
        self._call("log_batch", run_id, metrics=metrics, tags=tags)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        """Tag the epoch a restart of this trial resumes from (registered after its result)."""
        run_id = self._run_for(trial)
        if run_id is not None and trial.last_result:
            epoch = str(trial.last_result.get("epoch", 0))
            self._call("log_batch", run_id, tags=[RunTag(CHECKPOINT_TAG, epoch)])

    def _finish(self, trial, errored: bool) -> None:
        run_id = self._run_for(trial)
        last = self.last.get(trial.trial_id) or trial.last_result or {}
        status = trial_status(int(last.get("epoch", 0)), self.max_t, errored)
        if run_id is not None:
            self._call("log_batch", run_id, tags=[RunTag(STATUS_TAG, status)])
            if last.get("map_weights"):
                self._log_map_weights(run_id, trial, json.loads(last["map_weights"]))
            self._call("set_terminated", run_id, status="FAILED" if errored else "FINISHED")
        if self.on_done:
            self.on_done(status, {**trial.config, **{k: last.get(k) for k in ("val_acc", "epoch")}})

    def _log_map_weights(self, run_id: str, trial, map_weights: list) -> None:
        """A mixing head's learned (t, block) weights: a heatmap PNG and the table as JSON."""
        from orchestrator.plots import weights_heatmap
        if self._artifacts is None:  # kept until the process ends: a buffered call is replayed later
            self._artifacts = tempfile.mkdtemp(prefix="diffsweep-artifacts-")
        folder = os.path.join(self._artifacts, trial.trial_id)
        os.makedirs(folder, exist_ok=True)
        title = f"{trial.config.get('dataset')}: mixing weights (%)"
        weights_heatmap(map_weights, Path(folder) / "mixing_weights.png", title=title)
        with open(os.path.join(folder, "mixing_weights.json"), "w") as f:
            json.dump(map_weights, f)
        self._call("log_artifacts", run_id, folder, artifact_path="heatmaps")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, errored=True)

    def on_experiment_end(self, trials, **info):
        self._call("get_run", self.parent_run_id)  # flushes whatever is still buffered

    def get_state(self) -> dict:
        return {"runs": self.runs}

    def set_state(self, state: dict) -> None:
        self.runs = dict(state.get("runs", {}))
