"""Sweeps on real Ray clusters, on this one machine (issue "Cluster").

1. Multi-node: a `ray.cluster_utils.Cluster` with a head that has no CPUs and two 1-CPU worker nodes;
   a tiny sweep through the public API (`load_config` + `run_sweep(cfg, address=...)`) must place
   trials on both workers (each trial reports `node_id`) and export the selected config.
2. Job submission (tests/test_cluster_job.py): `ray start --head` with the dashboard on 127.0.0.1, then
   `ray job submit --working-dir <repo> -- python -m orchestrator run SPACE --address auto`, exactly as
   cluster/README.md documents it; the job must succeed and export at the spec's absolute export_dir.

Isolation from the rest of the session (the `ray_local` fixture's Ray) and from other Ray
instances on the machine:
- the multi-node sweep runs in a child Python (`python -m tests.test_cluster_run multinode ...`), so
  it owns its Ray and cannot disturb, or be disturbed by, a `ray_local` already initialised here;
- every Ray started here gets a private temp dir (RAY_TMPDIR / `--temp-dir`, a short path under /tmp
  because unix socket paths must stay under 108 characters), so nothing touches /tmp/ray or the
  `ray_current_cluster` file other Ray users on the machine read;
- `ray stop` is never run: it stops every Ray on the machine. The job-submit head runs as
  `ray start --head --block` in a new process group; SIGTERM makes it shut down the processes it
  started, then SIGKILL goes to whatever is left in that group (by its id), and any process still
  naming our private temp dir is killed by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.spaces import tiny_space  # noqa: E402

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
NUM_SAMPLES = 4
# a digits subset: these tests are about where the sweep runs, not how much it extracts
DIGITS = [{"name": "digits", "val_fraction": 0.15, "limit": {"train": 400}}]
# what `--working-dir` must not upload (Ray also skips what .gitignore lists, and .git/.venv by default)
EXCLUDES = [".venv", "runs", ".git", "*.arrow", "mlruns", "mlruns.db", "exported", "*.resume.pt", "__pycache__",
            "*.egg-info", ".pytest_cache"]


def _env(ray_tmp: Path) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled",  # local test clusters only (see cluster/README.md)
               RAY_TMPDIR=str(ray_tmp), RAY_DEDUP_LOGS="0", RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ADDRESS", None)  # never attach to someone else's cluster
    return env


def _private_tmp(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: socket paths < 108 chars


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held together while picked, so never the same one twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    except OSError as e:
        pytest.skip(f"cannot bind local TCP ports: {e}")
    finally:
        for s in socks:
            s.close()


def _trial_nodes(trial_dir_root: Path) -> dict[str, set[str]]:
    """trial id -> the node ids it reported: from Tune's experiment state (last result) and, when
    Tune wrote them, every line of the trials' result.json."""
    from ray.tune import ExperimentAnalysis

    nodes: dict[str, set[str]] = {}
    for trial in ExperimentAnalysis(str(trial_dir_root)).trials:
        node = (trial.last_result or {}).get("node_id")
        nodes.setdefault(trial.trial_id, set()).update([node] if node else [])
    for result_json in trial_dir_root.glob("*/result.json"):
        for line in result_json.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("node_id"):
                    nodes.setdefault(row.get("trial_id", result_json.parent.name), set()).add(row["node_id"])
    return nodes


# --- 1. multi-node: ray.cluster_utils.Cluster, head + 2 workers ------------------------------------

def multinode_sweep(tmp: Path) -> dict:
    """Runs in the child process: start the cluster, run the sweep against it, describe what happened."""
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.config import load_config
    from orchestrator.sweep import run_sweep, sweep_dir

    ray.shutdown()  # a fresh process, but be explicit: this Ray is the cluster's, nobody else's
    store = 100 * 1024 ** 2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": store})
    try:
        workers = {name: cluster.add_node(num_cpus=1, resources={name: 1}, object_store_memory=store)
                   for name in ("worker_a", "worker_b")}
        cluster.wait_for_nodes()
        # all paths in tmp: shared by construction; two trials at a time, one per worker node
        cfg = load_config(tiny_space(tmp, num_samples=NUM_SAMPLES, datasets=DIGITS, serial_extraction=False,
                                      max_concurrent=2))
        outcome = run_sweep(cfg, address=cluster.address)
        return {"head": cluster.head_node.node_id,
                "workers": {name: node.node_id for name, node in workers.items()},
                "trial_nodes": {k: sorted(v) for k, v in _trial_nodes(sweep_dir(cfg)).items()},
                "export_dir": str(outcome.export_dir), "selected": sorted(outcome.selected),
                "trials": len(outcome.results)}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_multinode_sweep_spreads_trials_over_worker_nodes(tmp_path):
    ray_tmp = _private_tmp("dsm-")
    summary = tmp_path / "summary.json"
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "tests.test_cluster_run", "multinode", str(tmp_path),
                               str(summary)], cwd=ROOT, env=_env(ray_tmp), capture_output=True, text=True,
                              timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, f"multi-node sweep failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    print(f"multi-node sweep: {time.monotonic() - t0:.1f}s")
    info = json.loads(summary.read_text())

    assert info["trials"] == NUM_SAMPLES
    trial_nodes = info["trial_nodes"]
    assert len(trial_nodes) == NUM_SAMPLES and all(trial_nodes.values()), trial_nodes
    used = {n for nodes in trial_nodes.values() for n in nodes}
    workers = set(info["workers"].values())
    assert info["head"] not in used  # the head has no CPUs: no trial may land there
    assert used <= workers, (used, info["workers"])
    assert used == workers, f"trials ran on {len(used)} node(s), expected both workers: {trial_nodes}"

    exported = Path(info["export_dir"])
    assert exported == tmp_path / "exported" and info["selected"] == ["digits"]
    for name in ("digits.yaml", "digits.safetensors", "results.parquet"):
        assert (exported / name).is_file(), name


# --- 2. ray job submit against a `ray start --head` cluster ---------------------------------------

PORT_FLAGS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port", "node-manager-port",
              "object-manager-port")


def _start_head(ray_tmp: Path, env: dict, log: Path, attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on free ports (all of them: another Ray on this machine may hold the
    defaults, e.g. 10001 or 52365); retried on a port race. Returns the process and the dashboard URL."""
    for _ in range(attempts):
        ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--temp-dir={ray_tmp}",
               f"--object-store-memory={100 * 1024 ** 2}", "--disable-usage-stats",
               *(f"--{flag}={port}" for flag, port in ports.items())]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{ports['dashboard-port']}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url + "/api/version", timeout=2):
                    return proc, url
            except OSError:
                time.sleep(0.5)
        _stop_head(proc, ray_tmp)
        text = log.read_text()
        if "already occupied" not in text and "Failed to bind" not in text and "address already in use" not in text:
            raise AssertionError(f"ray start --head did not come up:\n{text[-4000:]}")
    pytest.skip("ray start --head: its ports were taken each time (busy machine)")


def _pids_naming(path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(path).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _stop_head(proc: subprocess.Popen, ray_tmp: Path) -> None:
    """Stop only the Ray this test started (never `ray stop`, which stops every Ray on the machine)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` then shuts down the processes it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)  # anyone left in the group `ray start` led?
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.poll()
    for pid in _pids_naming(ray_tmp):  # our private temp dir is in every Ray process's command line
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":  # the child process of test_multinode_sweep_spreads_trials_over_worker_nodes
    if sys.argv[1:2] == ["multinode"]:
        result = multinode_sweep(Path(sys.argv[2]))
        Path(sys.argv[3]).write_text(json.dumps(result))
        sys.exit(0)
    sys.exit(f"usage: python -m tests.test_cluster_run multinode TMP SUMMARY.json (got {sys.argv[1:]})")
