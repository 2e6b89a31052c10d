"""A failing trial is visible: one line per failed trial with its log, counted in the table, shown by
`diffsweep status`; a dataset where no trial finished makes the run exit non-zero."""

import pytest

from orchestrator.cli import main
from tests.spaces import tiny_space

pytestmark = pytest.mark.slow


def test_every_trial_failing_is_reported_and_exits_non_zero(ray_local, tmp_path, capsys):
    # an attention width its head count does not divide: valid YAML, fails inside every trial
    space = tiny_space(tmp_path, name="failing", heads={"attention": {"dim": [30], "heads": [4], "depth": [1]}},
                       num_samples=2, asha={"max_t": 1, "grace_period": 1, "reduction_factor": 2})
    assert main(["run", str(space)]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("trial ") and " failed: " in line]
    assert len(failed) == 2 and all("is invalid" in line and "error.txt" in line for line in failed)
    assert "2 failed" in out
    assert "no trial finished: 2 of 2 failed; first error:" in out
    assert main(["status", "failing", "--storage-path", str(tmp_path / "ray")]) == 0
    status = capsys.readouterr().out
    assert "best val_acc" in status and "last val_acc" in status
    assert sum("error:" in line and "is invalid" in line for line in status.splitlines()) == 2
