"""benchmarks/head_comparison.py --quick (its own file: four real sweeps run beside the other benchmarks)."""

import re
from pathlib import Path

import pytest

from tests.test_benchmarks import last_line


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="needs dataset-fashion-mnist")
def test_head_comparison_quick(tmp_path):
    """A pooled and a spatial head, DDPM and random weights, each a real run_sweep on a tiny Fashion-MNIST
    subset (all six heads take 12 sweeps, minutes of fixed cost: the default run covers them)."""
    line = last_line("head_comparison.py", "--quick", "--heads", "linear,cnn", "--workdir", str(tmp_path),
                     timeout=900)
    m = re.fullmatch(r"ddpm_beats_random=(\d+)/(\d+)", line)
    assert m, line
    assert int(m.group(2)) == 2 and int(m.group(1)) <= 2, line
    assert (tmp_path / "head_comparison.png").stat().st_size > 0
