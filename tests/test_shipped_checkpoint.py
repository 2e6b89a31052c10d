"""Every DDPM shipped in trials/checkpoints/ is what its sidecar says: same bytes, loadable as its
architecture, small enough to ship, and the chain of commands that rebuilds it written down."""

import json
from pathlib import Path

import pytest

from orchestrator.config import SHIPPED_CHECKPOINT
from orchestrator.export import portable_checkpoint_path, resolve_checkpoint_path
from trials.ddpm import sha256_file
from trials.unet import load_checkpoint, make_config


SHIPPED = sorted(SHIPPED_CHECKPOINT.parent.glob("*.safetensors"))


@pytest.mark.parametrize("checkpoint", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_checkpoint_matches_its_sidecar_and_records_its_lineage(checkpoint):
    sidecar = json.loads(checkpoint.with_suffix(".json").read_text())
    assert sha256_file(checkpoint) == sidecar["sha256"]
    assert checkpoint.stat().st_size <= 25 * 2**20  # the limit for a shipped file
    model = load_checkpoint(checkpoint, sidecar["arch"])  # strict: every key, every shape
    assert make_config(sidecar["arch"]).to_flags() == sidecar["flags"] == model.config.to_flags()
    assert sidecar["weights"] == "ema" and sidecar["dataset"] == "fashion_mnist"
    # continued from an earlier run: both commands are recorded, and the steps add up
    lineage = sidecar.get("init_from")
    if lineage is not None:
        assert lineage["command"].startswith("diffsweep train-ddpm ") and len(lineage["sha256"]) == 64
        assert sidecar["total_steps"] == lineage["steps"] + sidecar["steps"]
    assert sidecar["command"].startswith("diffsweep train-ddpm ") and f"--steps {sidecar['steps']} " in sidecar["command"]
    assert checkpoint.with_suffix(".samples.png").is_file()


def test_a_checkpoint_in_the_package_is_exported_relative_to_the_package(tmp_path):
    for checkpoint in SHIPPED:  # an export then works from any clone
        portable = portable_checkpoint_path(str(checkpoint))
        assert portable == f"package:trials/checkpoints/{checkpoint.name}"
        assert resolve_checkpoint_path(portable) == checkpoint
    elsewhere = str(tmp_path / SHIPPED_CHECKPOINT.name)  # same name, not the package's file
    assert portable_checkpoint_path(elsewhere) == elsewhere
    assert resolve_checkpoint_path(elsewhere) == Path(elsewhere)
