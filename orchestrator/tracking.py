"""MLflow: experiment = sweep name, one parent run per sweep, one child run per trial.

The callback runs on the driver and uses explicit run ids (MlflowClient), never a global active run,
so many trials log at once without interfering. If the tracking server blinks mid-sweep the calls
are buffered and replayed; the sweep never dies for it, and any gap left is reported at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback

log = logging.getLogger("diffsweep")
STATUS_TAG = "diffsweep.status"
TRIAL_ID_TAG = "diffsweep.trial_id"  # finds a trial's run again after an outage or a resume
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


HTTP_TIMEOUT_S = 5
HTTP_MAX_RETRIES = 0


@contextlib.contextmanager
def bounded_http() -> Iterator[None]:
    """MLflow HTTP calls made inside get one try, HTTP_TIMEOUT_S seconds to connect and as many for the
    answer (requests applies the timeout to each). A value already in the environment wins.

    For the trial callback only: it runs on Tune's controller, where MLflow's defaults (a 120 s timeout,
    7 retries with exponential backoff: about 4 minutes) let one call to a server that is down hold the
    whole sweep, and it buffers and replays by itself. The parent run's calls keep MLflow's defaults: they
    are not buffered, and a server slow to answer its first request (measured: > 5 s on a busy machine)
    must not end the sweep. MLflow reads these variables per request; the driver calls from one thread."""
    bounds = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(HTTP_TIMEOUT_S),
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(HTTP_MAX_RETRIES)}
    added = [k for k in bounds if k not in os.environ]
    os.environ.update({k: bounds[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class MlflowTrialCallback(Callback):
    """One child run per Tune trial: params = its config, per-epoch metrics at step=epoch, and the
    tag `diffsweep.status` in {completed, pruned, failed}. A resumed trial continues its own run; the
    run of a trial a resume no longer has is closed as KILLED with the status `abandoned`.

    Each trial has its own ordered backlog of calls. When the server is down, the calls wait there; the
    next event delivers them in order: first the trial's run (found by its `diffsweep.trial_id` tag,
    else created, so a create whose answer was lost is never made twice), then its calls. Each event
    stops at the first failing call, so an outage costs Tune's controller at most one bounded call per
    event (see bounded_http)."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, max_t: int,
                 on_done: Callable[[str, dict], None] | None = None):
        self.uri, self.experiment_id, self.parent_run_id, self.max_t = uri, experiment_id, parent_run_id, max_t
        self.runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self.configs: dict[str, dict] = {}  # Tune trial id -> its config (to create its run later)
        self.last: dict[str, dict] = {}
        self.logged_epoch: dict[str, int] = {}  # the highest epoch whose metrics were sent (or buffered)
        self.where: dict[str, dict] = {}
        self.backlog: dict[str, list[tuple[str, dict]]] = {}  # trial id -> calls not delivered yet, in order
        self.refused = 0  # calls the server answered with a 4xx error (dropped, counted in gaps)
        self.on_done = on_done
        self._client: MlflowClient | None = None
        self._artifacts: str | None = None  # folder of files waiting to be (or already) logged

    def __reduce__(self):
        # Tune pickles this callback into tuner.pkl when the Tuner is made, and Tuner.restore (which
        # takes no callbacks) brings that copy back. Unpickle it as the callback the resuming driver
        # built (see `restoring_into`), so the events reach the callback whose runs the export reads.
        return _restored_callback, (self.uri, self.experiment_id, self.parent_run_id, self.max_t)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    @property
    def gaps(self) -> int:
        """MLflow calls not delivered: still buffered, or refused by the server."""
        return sum(len(calls) for calls in self.backlog.values()) + self.refused

    def run_id_of(self, trial_id: str) -> str | None:
        """The trial's child run: known to this driver, else found in MLflow by its tag."""
        if trial_id not in self.runs:
            try:
                with bounded_http():
                    found = self._find_run(trial_id)
            except Exception:  # noqa: BLE001 - reported as a gap, never fatal
                return None
            if found is not None:
                self.runs[trial_id] = found.info.run_id
        return self.runs.get(trial_id)

    def _find_run(self, trial_id: str):
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial_id}' and "
                                                f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=1)
        return found[0] if found else None

    def _ensure_run(self, trial_id: str) -> str:
        """The trial's run id, finding or creating the run (raises while the server is down)."""
        if trial_id in self.runs:
            return self.runs[trial_id]
        found = self._find_run(trial_id)  # a resumed sweep, or a create whose answer was lost
        if found is not None:
            run_id = found.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            has_params = bool(found.data.params)
        else:
            c = self.configs.get(trial_id, {})
            name = f"{c.get('dataset')}-{c.get('head')}-t{c.get('t')}-b{c.get('block')}-{trial_id}"
            run_id = self.client.create_run(
                self.experiment_id, run_name=name,
                tags={"mlflow.parentRunId": self.parent_run_id, TRIAL_ID_TAG: trial_id,
                      "diffsweep.dataset": str(c.get("dataset")), STATUS_TAG: "running"}).info.run_id
            has_params = False
        self.runs[trial_id] = run_id
        if not has_params:  # first in the trial's backlog, so a failure here is replayed like the rest
            params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                      for k, v in self.configs.get(trial_id, {}).items()]
            self.backlog.setdefault(trial_id, []).insert(0, ("log_batch", {"params": params}))
        return run_id

    def _deliver(self, trial_id: str) -> bool:
        """Send the trial's backlog in order; False at the first failure (the rest stays buffered)."""
        calls = self.backlog.setdefault(trial_id, [])
        try:
            run_id = self._ensure_run(trial_id)
            while calls:
                method, kwargs = calls[0]
                try:
                    getattr(self.client, method)(run_id, **kwargs)
                except MlflowException as e:
                    if not _refused(e):
                        raise
                    # refused, not delayed (a bad value, a deleted run): retrying cannot help, and
                    # it must not hold back the trial's later calls
                    self.refused += 1
                    log.warning("MLflow refused %s for trial %s (%s); dropped", method, trial_id, str(e)[:120])
                calls.pop(0)
        except Exception as e:  # noqa: BLE001 - any tracking failure must not kill the sweep
            log.warning("MLflow unreachable (%s); %d call(s) buffered", str(e)[:120], self.gaps)
            return False
        return True

    def _flush(self, first: str | None = None, bounded: bool = True) -> None:
        """Deliver `first`'s backlog, then every other trial's; stop at the first failure."""
        order = ([first] if first else []) + [t for t, calls in self.backlog.items() if calls and t != first]
        with bounded_http() if bounded else contextlib.nullcontext():
            for trial_id in order:
                if not self._deliver(trial_id):
                    return

    def _send(self, trial, method: str | None = None, **kwargs) -> None:
        self.configs.setdefault(trial.trial_id, dict(trial.config))
        if method:
            self.backlog.setdefault(trial.trial_id, []).append((method, kwargs))
        self._flush(trial.trial_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._send(trial)  # makes (or finds) the trial's run

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = result
        step = int(result.get("epoch", 0))
        # A trial killed after reporting an epoch but before Tune registered that epoch's checkpoint
        # (a separate save round trip) restarts from the previous checkpoint and runs the epoch again,
        # with the same seed: its curve keeps the first value of each epoch. The result's own
        # timestamp: a replayed metric is the same row, which MLflow stores once.
        fresh = step > self.logged_epoch.get(trial.trial_id, 0)
        metrics = [Metric(k, float(result[k]), int(result.get("timestamp", 0)) * 1000, step)
                   for k in ("val_acc", "train_loss") if k in result and fresh]
        self.logged_epoch[trial.trial_id] = max(step, self.logged_epoch.get(trial.trial_id, 0))
        # where the trial runs now (it changes when a failed trial is restarted elsewhere)
        where = {f"diffsweep.{k}": str(result[k]) for k in ("hostname", "node_id", "pid") if k in result}
        tags = [RunTag(k, v) for k, v in where.items()] if where != self.where.get(trial.trial_id) else []
        self.where[trial.trial_id] = where
        self._send(trial, "log_batch", metrics=metrics, tags=tags)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        """Tag the epoch a restart of this trial resumes from (registered after its result)."""
        if trial.last_result:
            epoch = str(trial.last_result.get("epoch", 0))
            self._send(trial, "log_batch", tags=[RunTag(CHECKPOINT_TAG, epoch)])

    def _finish(self, trial, errored: bool) -> None:
        last = self.last.get(trial.trial_id) or trial.last_result or {}
        status = trial_status(int(last.get("epoch", 0)), self.max_t, errored)
        self.backlog.setdefault(trial.trial_id, []).append(("log_batch", {"tags": [RunTag(STATUS_TAG, status)]}))
        if last.get("map_weights"):
            self._log_map_weights(trial, json.loads(last["map_weights"]))
        self._send(trial, "set_terminated", status="FAILED" if errored else "FINISHED")
        if self.on_done:
            self.on_done(status, {**trial.config, **{k: last.get(k) for k in ("val_acc", "epoch")}})

    def _log_map_weights(self, trial, map_weights: list) -> None:
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
        self.backlog.setdefault(trial.trial_id, []).append(
            ("log_artifacts", {"local_dir": folder, "artifact_path": "heatmaps"}))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, errored=True)

    def on_experiment_end(self, trials, **info):
        # Whatever is still buffered, with the parent run's patience (MLflow's own retries, minutes): the
        # controller has nothing left to keep responsive, and a sweep whose last trials end during an
        # outage still gets their runs once the server is back (measured: all five trials of a test sweep
        # ended while a restarted server was still starting).
        self._flush(bounded=False)
        if not any(self.backlog.values()):  # the server answered: closing orphans costs no second wait
            self._close_abandoned({t.trial_id for t in trials})

    def _close_abandoned(self, trial_ids: set[str]) -> None:
        """Tag `abandoned` the child runs of trials the sweep no longer has, and mark KILLED those still
        RUNNING. A driver killed after a trial started but before Tune's next experiment snapshot leaves
        that trial's run behind (RUNNING, or already ended: measured, a trial pruned after one epoch), and
        `resume` does not know the trial: its searcher suggests the config again as a new trial, so the
        old run is not one of the sweep's results."""
        try:
            token = None
            while True:
                page = self.client.search_runs(
                    [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
                    max_results=1000, page_token=token)
                for run in page:
                    tags = run.data.tags
                    trial_id = tags.get(TRIAL_ID_TAG)
                    if not trial_id or trial_id in trial_ids or tags.get(STATUS_TAG) == "abandoned":
                        continue
                    self.client.set_tag(run.info.run_id, STATUS_TAG, "abandoned")
                    if run.info.status == "RUNNING":
                        self.client.set_terminated(run.info.run_id, status="KILLED")
                token = page.token
                if not token:
                    break
        except Exception as e:  # noqa: BLE001 - bookkeeping; never fatal
            log.warning("MLflow: could not close the runs of abandoned trials (%s)", str(e)[:120])

    def get_state(self) -> dict:
        return {"runs": self.runs}

    def set_state(self, state: dict) -> None:
        self.runs.update(state.get("runs", {}))


def _refused(e: MlflowException) -> bool:
    """A 4xx answer other than 'too many requests' / 'timeout': the call itself is wrong."""
    status = e.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


_RESTORING: dict[str, MlflowTrialCallback] = {}  # parent run id -> the callback a resuming driver built


def _restored_callback(uri: str, experiment_id: str, parent_run_id: str, max_t: int) -> MlflowTrialCallback:
    return _RESTORING.get(parent_run_id) or MlflowTrialCallback(uri, experiment_id, parent_run_id, max_t)


@contextlib.contextmanager
def restoring_into(callback: MlflowTrialCallback) -> Iterator[None]:
    """While Tuner.restore runs, the first run's pickled callback comes back as `callback`."""
    _RESTORING[callback.parent_run_id] = callback
    try:
        yield
    finally:
        _RESTORING.pop(callback.parent_run_id, None)
