"""The quick CPU modes of the benchmarks run and end with their `key=value` line. Format only: no
timing assertions (machines are noisy; the benchmarks print ratios measured in the same run)."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
NUMBER = r"-?\d+(\.\d+)?"


def last_line(script: str, *args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_extract_throughput_cpu_small():
    line = last_line("extract_throughput.py", "--cpu-small", "--iters", "2")
    assert re.fullmatch(rf"ratio={NUMBER}", line), line


def test_extract_throughput_end_to_end_cpu_small():
    line = last_line("extract_throughput.py", "--end-to-end", "--cpu-small", "--iters", "1", "--batch", "32",
                     "--images", "96")
    assert re.fullmatch(rf"ratio={NUMBER}( ratio_fp32={NUMBER})?", line), line


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status (Linux)")
def test_trial_memory_quick():
    line = last_line("trial_memory.py", "--quick", "--images", "1000", "--epochs", "1")
    assert re.fullmatch(rf"rss_growth_mb={NUMBER} anon_growth_mb={NUMBER}", line), line


def test_ddpm_train_throughput_quick():
    line = last_line("ddpm_train_throughput.py", "--quick")
    assert re.fullmatch(rf"ratio={NUMBER}", line), line


def test_search_efficiency_quick():
    """diffsweep's searcher + Tune's ASHA against the grid and the baselines on a digits subset."""
    line = last_line("search_efficiency.py", "--quick", "--seeds", "0..0", timeout=600)
    m = re.fullmatch(rf"gap=({NUMBER}) epochs_fraction=({NUMBER}) beats_random=({NUMBER})", line)
    assert m, line
    fraction, beats = float(m.group(3)), float(m.group(5))
    assert 0 < fraction <= 1 and 0 <= beats <= 1, line


def test_search_efficiency_bad_seeds():
    proc = subprocess.run([sys.executable, str(BENCH / "search_efficiency.py"), "--seeds", "5..2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--seeds" in proc.stderr, proc.stderr


@pytest.mark.parametrize("script", ["sweep_cost.py", "trial_memory.py", "extract_throughput.py",
                                    "search_efficiency.py", "representation.py", "ddpm_train_throughput.py",
                                    "scale.py", "head_comparison.py"])
def test_help(script, monkeypatch, capsys):
    """`python benchmarks/<script> --help`, run in this process (`runpy`, as `python` runs a script: its
    folder first on sys.path): eight interpreters importing torch cost more than the check itself."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", [str(BENCH / script), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    assert done.value.code in (0, None) and "usage:" in capsys.readouterr().out
