"""`ray job submit` against a `ray start --head` cluster, exactly as cluster/README.md documents it
(isolation as described in tests/test_cluster_run.py; its own file: xdist runs files in parallel)."""

import json
import shutil
import subprocess
import time

import pytest

from tests.spaces import tiny_space
from tests.test_cluster_run import (BIN, DIGITS, EXCLUDES, NUM_SAMPLES, ROOT, _env, _private_tmp, _start_head,
                                    _stop_head)

pytestmark = pytest.mark.slow


@pytest.mark.network
def test_ray_job_submit_runs_the_sweep_on_a_started_cluster(tmp_path, mlflow_template):
    space = tiny_space(tmp_path, num_samples=NUM_SAMPLES, datasets=DIGITS, serial_extraction=False,
                       mlflow_template=mlflow_template)
    ray_tmp = _private_tmp("dsj-")
    env = _env(ray_tmp)
    t0 = time.monotonic()
    head, url = _start_head(ray_tmp, env, tmp_path / "ray_start.log")
    try:
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
             "--", "python", "-m", "orchestrator", "run", str(space), "--address", "auto"],
            env=env, capture_output=True, text=True, timeout=600)
    finally:
        _stop_head(head, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"ray start + job submit + sweep: {time.monotonic() - t0:.1f}s")
    output = job.stdout + job.stderr
    assert job.returncode == 0, f"ray job submit exited {job.returncode}:\n{output[-4000:]}"
    assert "succeeded" in output and "sweep 'tiny'" in output, output[-4000:]

    exported = tmp_path / "exported"  # the spec's absolute export_dir
    for name in ("digits.yaml", "digits.safetensors", "results.parquet"):
        assert (exported / name).is_file(), name
    import yaml
    doc = yaml.safe_load((exported / "digits.yaml").read_text())
    assert doc["selection"]["chosen_on"] == "validation"
