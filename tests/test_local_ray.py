"""`diffsweep run` without --address on a machine where `ray start --head` ran (issue 26, item 1).

A live head is joined (Ray's convention for a bare `ray.init()`), in one line; a head killed without
`ray stop` leaves its address in `ray_current_cluster`, and the run then starts a fresh local instance.
Never a traceback.

Isolation as in tests/test_cluster_run.py: every Ray here lives under a private RAY_TMPDIR (so the
`ray_current_cluster` file the driver reads is ours, not /tmp/ray's), runs in child processes (the
`ray_local` fixture's Ray is untouched), and is stopped by process group and by pid, never `ray stop`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.sweep import answers
from tests.spaces import tiny_space
from tests.test_cluster_run import BIN, _env, _free_ports, _pids_naming, _private_tmp, _stop_head

pytestmark = [pytest.mark.slow, pytest.mark.network]
HEAD_PORTS = ("port", "node-manager-port", "object-manager-port", "ray-client-server-port",
              "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
              "metrics-export-port")


def start_head(ray_tmp: Path, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block`, tried twice: Ray gives its raylet a fixed 30 s to register with the
    GCS, which a 2-core machine running the rest of the suite beside it has missed once."""
    try:
        return _start_head(ray_tmp, env, log)
    except AssertionError:
        kill_everything_under(ray_tmp)
        shutil.rmtree(ray_tmp / "ray", ignore_errors=True)
        return _start_head(ray_tmp, env, log.with_suffix(".retry.log"))


def _start_head(ray_tmp: Path, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on free ports, its temp dir where a bare ray.init() looks
    ($RAY_TMPDIR/ray). Returns the process and the GCS address it wrote to ray_current_cluster."""
    ports = dict(zip(HEAD_PORTS, _free_ports(len(HEAD_PORTS))))
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=false",
           "--node-ip-address=127.0.0.1", f"--temp-dir={ray_tmp / 'ray'}", "--disable-usage-stats",
           f"--object-store-memory={100 * 1024 ** 2}", *(f"--{flag}={port}" for flag, port in ports.items())]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address_file = ray_tmp / "ray" / "ray_current_cluster"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if address_file.exists() and answers(address := address_file.read_text().strip()):
            return proc, address
        time.sleep(0.5)
    _stop_head(proc, ray_tmp)
    raise AssertionError(f"ray start --head did not come up:\n{log.read_text()[-3000:]}")


def run_driver(tmp: Path, env: dict, store: Path, mlflow_template: Path) -> tuple[int, str]:
    # one trial: what is checked is where the sweep's Ray comes from, not the search (nor the extraction:
    # the session's shared store)
    space = tiny_space(tmp, num_samples=1, asha={"max_t": 2, "grace_period": 1, "reduction_factor": 2},
                       datasets=[{"name": "digits", "val_fraction": 0.15, "limit": {"train": 400}}], store=store,
                       mlflow_template=mlflow_template)
    driver = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(space)], cwd=tmp, env=env,
                            capture_output=True, text=True, timeout=400)
    return driver.returncode, driver.stdout + driver.stderr


def sessions(ray_tmp: Path) -> set[str]:
    return {p.name for p in (ray_tmp / "ray").glob("session_2*")}


def kill_everything_under(ray_tmp: Path) -> None:
    for pid in _pids_naming(ray_tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_live_local_cluster_is_joined_in_one_line(tmp_path, shared_features, mlflow_template):
    ray_tmp = _private_tmp("dsl-")
    env = _env(ray_tmp)
    try:
        head, address = start_head(ray_tmp, env, tmp_path / "ray_start.log")
        try:
            before = sessions(ray_tmp)
            t0 = time.monotonic()
            rc, output = run_driver(tmp_path, env, shared_features, mlflow_template)
            print(f"sweep on the joined head: {time.monotonic() - t0:.1f}s")
            after = sessions(ray_tmp)
        finally:
            _stop_head(head, ray_tmp)
    finally:
        kill_everything_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert rc == 0, output[-3000:]
    assert "Traceback" not in output and "must not be provided" not in output, output[-3000:]
    joined = [line for line in output.splitlines() if line.startswith("ray: joined the local cluster")]
    assert len(joined) == 1 and address in joined[0], output[-3000:]
    assert after == before  # the sweep ran on the head's session: no second Ray was started
    assert (tmp_path / "exported" / "digits.yaml").is_file()


def test_a_stale_local_cluster_address_starts_a_fresh_instance(tmp_path, shared_features, mlflow_template):
    ray_tmp = _private_tmp("dss-")
    env = _env(ray_tmp)
    try:
        # what a head killed without `ray stop` leaves: its address in ray_current_cluster, where
        # `ray start` wrote it, and nothing listening there any more (a free port). Killing a real
        # head gives the same state (measured before: the file stays, the address stops answering)
        # and cost this suite a whole `ray start`.
        address = f"127.0.0.1:{_free_ports(1)[0]}"
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(address + "\n")
        assert not answers(address)
        rc, output = run_driver(tmp_path, env, shared_features, mlflow_template)
    finally:
        kill_everything_under(ray_tmp)  # the fresh instance shuts down with its driver; this is a backstop
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert rc == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    stale = [line for line in output.splitlines() if line.startswith("ray: no Ray cluster answers")]
    assert len(stale) == 1 and address in stale[0], output[-3000:]
    assert (tmp_path / "exported" / "digits.yaml").is_file()
