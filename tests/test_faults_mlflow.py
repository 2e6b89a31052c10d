"""Faults: the MLflow server stopped at a trial's start and restarted (its own file: xdist runs files in parallel)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.spaces import tiny_space
from tests.test_faults import results, start, wait_for

pytestmark = pytest.mark.slow


# what the outage may add to the sweep's wall time beyond the outage itself: each Tune event makes at
# most one MLflow call that fails (a stopped server refuses at once; a hung one costs at most
# MLFLOW_HTTP_REQUEST_TIMEOUT = 5 s to connect + 5 s to answer), and the replay after it is one call
# per buffered call. Asserted generously: 60 s.
OUTAGE_BOUND_S = 60


def free_port() -> int:

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:

    try:
        with urllib.request.urlopen(url + "/health", timeout=2):
            return True
    except OSError:
        return False


def mlflow_server(tmp: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port over tmp's sqlite file; in its own process group."""
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
           f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=open(tmp / "mlflow_server.log", "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for(lambda: healthy(f"http://127.0.0.1:{port}") or proc.poll() is not None, timeout=180)
    assert proc.poll() is None, (tmp / "mlflow_server.log").read_text()[-3000:]
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its uvicorn workers
    except ProcessLookupError:
        pass
    proc.wait()


def timed_sweep(tmp: Path, name: str, url: str, during=None) -> float:
    # one trial at a time, three in all: the outage starts during the first and lasts until the second
    # has started, so the third is still to run when the server is back
    space = tiny_space(tmp, name=name, num_samples=3, max_concurrent=1,
                       datasets=[{"name": "digits", "val_fraction": 0.15, "limit": {"train": 600}}])
    t0 = time.monotonic()
    driver = start(["run", str(space), "--tracking-uri", url], tmp)
    if during:
        during(driver)
    assert driver.wait(timeout=600) == 0, (tmp / "driver.log").read_text()[-3000:]
    return time.monotonic() - t0


@pytest.mark.network
def test_mlflow_server_down_at_a_trials_start(tmp_path, mlflow_template):
    # no MLflow HTTP bounds in this test's environment: the drivers inherit it, and there a 5 s bound
    # also reached the parent run's calls (orchestrator/tracking.py `bounded_http` keeps those at MLflow's
    # defaults) and failed a driver's set-up on a loaded machine; this test's client only talks to a
    # running server
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    shutil.copyfile(mlflow_template, tmp_path / "server.db")  # the server's store, its schema built
    server = mlflow_server(tmp_path, port)
    outage = {}
    try:
        baseline = timed_sweep(tmp_path, "mlb", url)  # also fills the feature store both sweeps read

        def down_then_up(driver):
            client = MlflowClient(url)

            def a_child_has_an_epoch():
                exp = client.get_experiment_by_name("mlo")
                kids = [r for r in client.search_runs([exp.experiment_id]) if "diffsweep.trial_id" in r.data.tags] \
                    if exp else []
                return any(client.get_metric_history(k.info.run_id, "val_acc") for k in kids)

            wait_for(a_child_has_an_epoch, every=0.2)
            kill_group(server)
            t_down = time.monotonic()
            outage["before"] = set(results(tmp_path / "ray", "mlo"))
            # down until a trial has started and reported epochs with no server to create its run
            outage["started"] = wait_for(lambda: set(results(tmp_path / "ray", "mlo")) - outage["before"],
                                         timeout=300, every=0.2)
            outage["server"] = mlflow_server(tmp_path, port)  # same port, same database
            outage["seconds"] = time.monotonic() - t_down

        wall = timed_sweep(tmp_path, "mlo", url, during=down_then_up)
    finally:
        kill_group(outage.get("server", server))
        kill_group(server)
    print(f"baseline sweep {baseline:.1f}s, with the outage {wall:.1f}s, outage {outage['seconds']:.1f}s")

    client = MlflowClient(f"sqlite:///{tmp_path / 'server.db'}")
    exp = client.get_experiment_by_name("mlo")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("diffsweep.role") == "parent"]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    tune = results(tmp_path / "ray", "mlo")
    assert len(tune) == 3 and outage["started"] <= set(tune)
    by_trial = {}
    for k in kids:
        by_trial.setdefault(k.data.tags["diffsweep.trial_id"], []).append(k)
    assert set(by_trial) == set(tune) and all(len(v) == 1 for v in by_trial.values())  # one run per trial
    for trial_id, lines in tune.items():  # every epoch's val_acc exactly once: none lost, none repeated
        steps = [m.step for m in client.get_metric_history(by_trial[trial_id][0].info.run_id, "val_acc")]
        assert sorted(steps) == [r["epoch"] for r in lines], (trial_id, steps)
    assert all(k.data.tags["diffsweep.status"] in ("completed", "pruned") for k in kids)
    assert "could not be delivered" not in (tmp_path / "driver.log").read_text()
    assert wall <= baseline + outage["seconds"] + OUTAGE_BOUND_S
