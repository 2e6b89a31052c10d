"""A failing trial is visible: one line per failed trial with its log, counted in the table, shown by
`diffsweep status`; a dataset where no trial finished makes the run exit non-zero."""

import subprocess
import sys

import pytest

from orchestrator.cli import main
from tests.spaces import tiny_space

pytestmark = pytest.mark.slow


def test_every_trial_failing_is_reported_and_exits_non_zero(ray_local, tmp_path, capsys):
    # an attention width its head count does not divide: valid YAML, fails inside every trial
    space = tiny_space(tmp_path, name="failing", heads={"attention": {"dim": [30], "heads": [4], "depth": [1]}},
                       datasets=[{"name": "digits", "val_fraction": 0.15, "limit": {"train": 300}}],
                       num_samples=2, max_failures=0, asha={"max_t": 1, "grace_period": 1, "reduction_factor": 2})
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
