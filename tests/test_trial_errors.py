"""A failing trial is visible: one line per failed trial with its log, counted in the table, shown by
`diffsweep status`; a dataset where no trial finished makes the run exit non-zero."""

import subprocess
import sys

import pytest

from orchestrator.cli import main
from tests.spaces import tiny_space

pytestmark = pytest.mark.slow


def test_every_trial_failing_is_reported_and_exits_non_zero(ray_local, tmp_path, shared_features, mlflow_template,
                                                           capsys):
    # an attention width its head count does not divide: valid YAML, fails inside every trial
    space = tiny_space(tmp_path, name="failing", heads={"attention": {"dim": [30], "heads": [4], "depth": [1]}},
                       datasets=[{"name": "digits", "val_fraction": 0.15, "limit": {"train": 400}}], store=shared_features,
                       num_samples=2, max_failures=0, asha={"max_t": 1, "grace_period": 1, "reduction_factor": 2},
                       mlflow_template=mlflow_template)
    assert main(["run", str(space)]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("trial ") and " failed: " in line]
    assert len(failed) == 2 and all("is invalid" in line and "error.txt" in line for line in failed)
    assert "2 failed" in out
    assert "no trial finished: 2 of 2 failed; first error:" in out
    # `diffsweep status` as a user runs it: a fresh process with no Ray session (the error lines come
    # from the sweep's storage, not from Tune's driver-side staging copy, which needs one)
    status = subprocess.run([sys.executable, "-m", "orchestrator", "status", "failing", "--storage-path",
                             str(tmp_path / "ray")], capture_output=True, text=True, check=True).stdout
    assert "best val_acc" in status and "last val_acc" in status
    assert sum("error:" in line and "is invalid" in line for line in status.splitlines()) == 2


def test_a_failed_snapshot_upload_is_one_line_not_a_traceback():
    """Tune logs a failed upload of its experiment snapshot (a searcher temp file renamed while the copy
    listed the folder, seen once in this suite) with a traceback and carries on; a sweep shows one line."""
    import io
    import logging

    from ray.tune.execution import experiment_state

    from orchestrator.sweep import SnapshotErrorsInOneLine, quiet_snapshot_errors

    quiet_snapshot_errors()
    quiet_snapshot_errors()  # once per logger, however many sweeps a process runs
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    experiment_state.logger.addHandler(handler)
    try:
        try:
            raise FileNotFoundError("[Errno 2] Failed to open local file '.tmp-searcher-state.pkl'\nDetail: gone")
        except FileNotFoundError:  # as Tune's wait_for_sync logs it
            experiment_state.logger.error("Saving experiment state to storage at '/x' failed with exception: ",
                                          exc_info=True)
    finally:
        experiment_state.logger.removeHandler(handler)
    out = stream.getvalue()
    assert "Traceback" not in out and out.count("\n") == 1, out
    assert "FileNotFoundError: [Errno 2] Failed to open local file '.tmp-searcher-state.pkl'" in out
    assert "the next snapshot uploads it again" in out
    assert sum(isinstance(f, SnapshotErrorsInOneLine) for f in experiment_state.logger.filters) == 1
