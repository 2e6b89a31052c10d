"""benchmarks/head_comparison.py --quick (its own file: two real sweeps run beside the other benchmarks)."""

import re
from pathlib import Path

import pytest

from tests.test_benchmarks import last_line


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="needs dataset-fashion-mnist")
def test_head_comparison_quick(tmp_path):
    """One head, DDPM and random weights, each a real run_sweep on a tiny Fashion-MNIST subset, then the
    comparison's line and PNG. Every head type's sweep path is tested in tests/test_sweep_heads.py; here
    only the benchmark's own code is (all six heads take 12 sweeps, minutes of fixed cost)."""
    line = last_line("head_comparison.py", "--quick", "--heads", "linear", "--workdir", str(tmp_path),
                     timeout=900)
    m = re.fullmatch(r"ddpm_beats_random=(\d+)/(\d+)", line)
    assert m, line
    assert int(m.group(2)) == 1 and int(m.group(1)) <= 1, line
    assert (tmp_path / "head_comparison.png").stat().st_size > 0
