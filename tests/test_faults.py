"""Faults: a killed trial process and a killed driver lose nothing and repeat nothing."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.spaces import tiny_space

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def results(storage: Path, name: str) -> dict[str, list[dict]]:
    """Every result line Tune wrote, per trial id."""
    out = {}
    for path in glob.glob(str(storage / name / "*" / "result.json")):
        lines = []
        for line in open(path):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:  # the line Tune is writing right now
                break
        if lines:
            out[lines[0]["trial_id"]] = lines
    return out


def wait_for(predicate, timeout=600, every=0.5):
    start = time.time()
    while time.time() - start < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def children(tmp: Path, name: str):
    client = MlflowClient(f"sqlite:///{tmp / 'mlruns.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parent = [r for r in runs if r.data.tags.get("diffsweep.role") == "parent"]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return client, parent, kids


def start(args, tmp):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=tmp, env=env,
                            stdout=open(tmp / "driver.log", "a"), stderr=subprocess.STDOUT)


def test_driver_killed_mid_sweep_then_resumed(tmp_path, mlflow_template):
    digits = [{"name": "digits", "val_fraction": 0.15, "limit": {"train": 600}}]
    space = tiny_space(tmp_path, name="drv", datasets=digits, num_samples=4, mlflow_template=mlflow_template)
    driver = start(["run", str(space)], tmp_path)
    # kill the driver once at least one trial has finished and another has started
    wait_for(lambda: sum(len(v) >= 3 for v in results(tmp_path / "ray", "drv").values()) >= 1
             and len(results(tmp_path / "ray", "drv")) >= 2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = results(tmp_path / "ray", "drv")
    finished = {t: v for t, v in before.items() if len(v) >= 3}
    resumed = start(["resume", "drv", "--storage-path", str(tmp_path / "ray")], tmp_path)
    assert resumed.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    after = results(tmp_path / "ray", "drv")
    assert len(after) == 4  # no trial lost
    for trial_id, lines in finished.items():  # no finished trial ran again
        assert after[trial_id] == lines
    for lines in after.values():  # no epoch reported twice
        epochs = [r["epoch"] for r in lines]
        assert epochs == sorted(set(epochs))
    client, parent, kids = children(tmp_path, "drv")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    # a trial started after Tune's last snapshot is unknown to the resume: its run is tagged abandoned and
    # never left RUNNING (KILLED if it was running, FINISHED if it ended before the driver was killed)
    abandoned = [k for k in kids if k.data.tags["diffsweep.status"] == "abandoned"]
    assert all(k.info.status in ("KILLED", "FINISHED") and k.data.tags["diffsweep.trial_id"] not in after
               for k in abandoned)
    kids = [k for k in kids if k.data.tags["diffsweep.status"] != "abandoned"]
    assert len(kids) == 4 and len({k.data.tags["diffsweep.trial_id"] for k in kids}) == 4  # no duplicate runs
    assert all(k.data.tags["diffsweep.status"] in ("completed", "pruned") for k in kids)
    # the export names the winner's own child run (the resumed driver's callback saw the events)
    doc = yaml.safe_load((tmp_path / "exported" / "digits.yaml").read_text())
    assert doc["mlflow"]["parent_run_id"] == parent[0].info.run_id
    winner = next((k for k in kids if k.info.run_id == doc["mlflow"]["run_id"]), None)
    assert winner is not None, doc["mlflow"]
    assert winner.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert winner.data.tags["diffsweep.status"] == "completed"
    assert {k: winner.data.params[k] for k in ("head", "t", "block")} == \
        {"head": doc["head"]["type"], "t": str(doc["selection"]["t"]), "block": str(doc["selection"]["block"])}
    assert "MLflow call(s) could not be delivered" not in (tmp_path / "driver.log").read_text()
