"""benchmarks/scale.py --quick (its own file: the longest benchmark runs beside the others under xdist)."""

import re
from pathlib import Path

import pytest

from tests.test_benchmarks import NUMBER, last_line


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="needs dataset-fashion-mnist")
def test_scale_quick():
    # smaller than --quick (16 / 200 images, not 48 / 600): this checks the benchmark's
    # path and its last line, not its figures (the README's come from `--quick` and the default run)
    line = last_line("scale.py", "--quick", "--images", "16", "--trial-images", "200", timeout=900)
    m = re.fullmatch(rf"extract_rss_ratio=({NUMBER}) trial_kb_per_image=({NUMBER}) pooled_epoch_speedup=({NUMBER}) "
                     rf"ckpt_per_trial=(?P<ckpt>{NUMBER}) plan_bytes_error=({NUMBER})", line)
    assert m, line
    assert float(m.group("ckpt")) <= 2  # checkpoints kept per finished trial: a count, not a timing
