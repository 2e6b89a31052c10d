"""The command line as a user meets it: fast refusals, no silent re-runs, every option described,
hints that run as printed, world-readable exports, and `predict`'s flags."""

import argparse
import json
import os
import shlex
import stat
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from orchestrator.cli import build_parser, main
from tests.conftest import ROOT, fashion_mnist_available

EXAMPLE = ROOT / "examples" / "fashion_mnist" / "fashion_mnist.yaml"


def walk(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_help_option_has_a_description():
    undocumented = [f"{' '.join(p)} {a.option_strings or a.dest}" for p, a in walk(build_parser())
                    if not (a.help or "").strip()]
    assert undocumented == []
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert all(choice.help for choice in sub._choices_actions)


def test_bad_yaml_is_refused_before_torch_ray_or_mlflow_load(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbogus: 1\n")
    code = ("import sys; from orchestrator.cli import main; rc = main(['run', sys.argv[1]]); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(bad)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stdout.strip() == "[]"
    assert proc.stderr.strip().splitlines() == ["diffsweep: error: sweep spec " + str(bad) + ": datasets: Field required"]


def existing_sweep(tmp_path):
    spec = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    spec.update(storage_path=str(tmp_path / "ray"), export_dir=str(tmp_path / "exported"),
                tracking={"uri": f"sqlite:///{tmp_path / 'mlruns.db'}"})
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(spec))
    (tmp_path / "ray" / spec["name"]).mkdir(parents=True)
    (tmp_path / "ray" / spec["name"] / "diffsweep_sweep.json").write_text("{}")
    return path, spec["name"]


def test_a_rerun_of_a_sweep_name_is_refused_with_the_choices(tmp_path, capsys):
    path, name = existing_sweep(tmp_path)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"resume {name}" in err[0] and "--overwrite" in err[0] and "--name" in err[0]
    assert not (tmp_path / "exported").exists() and not (tmp_path / "mlruns.db").exists()


def test_overwrite_replaces_the_earlier_sweep_state(tmp_path, capsys):
    from orchestrator.config import load_config
    from orchestrator.rerun import check_new_sweep

    path, name = existing_sweep(tmp_path)
    cfg = load_config(path)
    check_new_sweep(cfg, overwrite=True)
    assert not (tmp_path / "ray" / name).exists()
    assert "replaced the earlier sweep" in capsys.readouterr().err
    check_new_sweep(cfg)  # nothing there now: no refusal
    assert "--overwrite" in (ROOT / "Makefile").read_text().split("quickstart:")[1].split("\n")[1]


def test_hints_run_as_printed():
    from orchestrator.hints import diffsweep_command, mlflow_command

    for command in (diffsweep_command(), mlflow_command()):
        proc = subprocess.run([*shlex.split(command), "--help"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert proc.returncode == 0, (command, proc.stderr[-300:])


def test_exported_files_are_world_readable(tmp_path):
    import torch
    from safetensors.torch import save_file

    from orchestrator.export import _atomic_write

    old = os.umask(0o077)  # the strictest umask a user may have; export files are meant to be shared
    try:
        _atomic_write(tmp_path / "h.safetensors", lambda p: save_file({"w": torch.zeros(2)}, str(p)))
        _atomic_write(tmp_path / "h.yaml", lambda p: p.write_text("a: 1\n"))
    finally:
        os.umask(old)
    for name in ("h.safetensors", "h.yaml"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


@pytest.mark.skipif(not fashion_mnist_available(), reason="needs apt-get install dataset-fashion-mnist")
def test_predict_batches_ranks_and_reports_a_bad_image_on_its_own_line(tmp_path, capsys):
    from trials.datasets import load_dataset

    samples = load_dataset("fashion_mnist").splits["test"][:5]
    paths = []
    for s in samples:
        Image.fromarray(s.source).save(tmp_path / f"{s.image_id}.png")
        paths.append(str(tmp_path / f"{s.image_id}.png"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    args = ["predict", "--config", str(EXAMPLE), "--batch-size", "2", "--device", "cpu"]
    assert main([*args, "--top-k", "3", paths[0], str(bad), *paths[1:]]) == 2
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == paths and all(len(line.split("\t")) == 5 for line in lines)
    assert len(err.strip().splitlines()) == 1 and "bad.png" in err
    assert main([*args, "--json", *paths]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == paths and all(len(r["top_k"]) == 1 for r in rows)
    assert [r["label"] for r in rows] == [line.split("\t")[1] for line in lines]
