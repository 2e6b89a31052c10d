"""Faults: a killed trial process and a killed driver lose nothing and repeat nothing."""

import glob
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.sweep import tune_restored_states
from tests.spaces import tiny_space
from trials.trainable import EPOCH_FILE, WEIGHTS_FILE

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


def start(args, tmp, **env):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **env}
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=tmp, env=env,
                            stdout=open(tmp / "driver.log", "a"), stderr=subprocess.STDOUT)


def is_checkpoint(rel: Path) -> bool:
    return any(part.startswith("checkpoint_") for part in rel.parts)


def saved_state(experiment: Path) -> dict[Path, bytes] | None:
    """The experiment folder as Tune's snapshots and their sync left it: every file but the trials'
    checkpoint folders (which workers write directly). None while a file is being written: the sync
    copies into place, so a state file read mid-copy is short (a 0-byte searcher state taken that way
    once made the resumed driver hang; `diffsweep resume` now refuses such a state in one line)."""
    files, pickled = {}, tune_restored_states()
    try:
        for path in experiment.rglob("*"):
            rel = path.relative_to(experiment)
            if path.is_file() and not is_checkpoint(rel):
                files[rel] = path.read_bytes()
                if rel.name.startswith("experiment_state"):
                    json.loads(files[rel])
                elif any(fnmatch(rel.name, pattern) for pattern in pickled):
                    pickle.loads(files[rel])  # Tune's pickles (the search_gen_state .json too)
    except (FileNotFoundError, ValueError, EOFError, pickle.UnpicklingError):
        return None
    return files


def reported_epochs(state: dict[Path, bytes]) -> dict[Path, int]:
    """Trial folder -> epochs its result.json holds in a saved state."""
    out = {}
    for rel, data in state.items():
        if rel.name == "result.json":
            out[rel.parent] = sum(1 for line in data.decode().splitlines() if line.endswith("}"))
    return out


def roll_back(experiment: Path, state: dict[Path, bytes]) -> None:
    """What a driver killed before its last snapshots reached storage leaves: an older saved state
    beside newer checkpoint folders."""
    for path in list(experiment.rglob("*")):
        if path.is_file() and not is_checkpoint(path.relative_to(experiment)):
            path.unlink()
    for rel, data in state.items():
        (experiment / rel).parent.mkdir(parents=True, exist_ok=True)
        (experiment / rel).write_bytes(data)


def test_driver_killed_mid_sweep_then_resumed(tmp_path, mlflow_template):
    """The driver is killed and its saved state (Tune's experiment snapshot, synced in the background) is
    older than the trials' checkpoints, as a kill between a checkpoint and the next snapshot's sync leaves
    it. Resume restores each unfinished trial from the checkpoint that state names though a newer one
    superseded it (its weights dropped: orchestrator/checkpoints.py), by replaying its epochs: the first
    run's metrics, nothing lost, no finished trial run again."""
    digits = [{"name": "digits", "val_fraction": 0.15, "limit": {"train": 600}}]
    max_t, grace = 6, 4
    space = tiny_space(tmp_path, name="drv", datasets=digits, num_samples=4, mlflow_template=mlflow_template,
                       asha={"max_t": max_t, "grace_period": grace, "reduction_factor": 3})
    experiment = tmp_path / "ray" / "drv"
    # Tune snapshots its experiment state every 10 s or more by default; every 0.5 s, so the paused trial
    # below is in a saved state within seconds
    driver = start(["run", str(space)], tmp_path, TUNE_GLOBAL_CHECKPOINT_S="0.5")

    def early_trial():
        """A trial with a checkpoint two epochs or more before its first rung, so that it has one more after
        any its saved state names (one may be in flight when it is paused): (its process, trial id)."""
        client, _, kids = children(tmp_path, "drv")
        for k in kids:
            if 1 <= int(k.data.tags.get("diffsweep.checkpoint_epoch", 0)) <= grace - 2 and "diffsweep.pid" in k.data.tags:
                return int(k.data.tags["diffsweep.pid"]), k.data.tags["diffsweep.trial_id"]
        return None

    # Trials here take about a second, less than a snapshot's lag: pause one, so that a saved state
    # catches it mid-way, then let it supersede the checkpoint that state names, and kill the driver.
    worker, trial_id = wait_for(early_trial, timeout=120, every=0.05)
    os.kill(worker, signal.SIGSTOP)
    trial_dir = next(experiment.glob(f"*_{trial_id}_*"))  # its checkpoints are there already

    def caught():
        """A saved state with an epoch of the paused trial: (state, the checkpoint of its last epoch there)."""
        state = saved_state(experiment)
        n = reported_epochs(state or {}).get(trial_dir.relative_to(experiment), 0)
        return (state, trial_dir / f"checkpoint_{n - 1:06d}") if n else None

    behind, named = wait_for(caught, timeout=120, every=0.05)
    os.kill(worker, signal.SIGCONT)
    wait_for(lambda: (named / EPOCH_FILE).exists() and not (named / WEIGHTS_FILE).exists(), timeout=120,
             every=0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    first_run = results(tmp_path / "ray", "drv")
    roll_back(experiment, behind)
    before = results(tmp_path / "ray", "drv")
    finished = {t: v for t, v in before.items() if len(v) >= max_t}
    resumed = start(["resume", "drv", "--storage-path", str(tmp_path / "ray")], tmp_path)
    assert resumed.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    after = results(tmp_path / "ray", "drv")
    assert len(after) == 4  # no trial lost
    for trial_id, lines in finished.items():  # no finished trial ran again
        assert after[trial_id] == lines
    for lines in after.values():
        epochs = [r["epoch"] for r in lines]
        # no epoch lost; one reported after the saved state's checkpoint is reported again after the
        # resume (Tune's result.json runs ahead of its experiment state), with the same result
        assert epochs == sorted(epochs) and sorted(set(epochs)) == list(range(1, epochs[-1] + 1))
        assert all(len({r["val_acc"] for r in lines if r["epoch"] == e}) == 1 for e in epochs)
    for trial_id in before:  # resumed where the old state left them, by replay: the first run's metrics
        again = {r["epoch"]: r["val_acc"] for r in after[trial_id]}
        assert all(again[r["epoch"]] == r["val_acc"] for r in first_run[trial_id] if r["epoch"] in again)
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
