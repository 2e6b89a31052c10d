"""The shipped DDPM is what its sidecar says: same bytes, loadable as its architecture, small enough to
ship, and the chain of commands that rebuilds it written down."""

import json

from orchestrator.config import SHIPPED_CHECKPOINT
from trials.ddpm import sha256_file
from trials.unet import load_checkpoint, make_config


def test_shipped_checkpoint_matches_its_sidecar_and_records_its_lineage():
    sidecar = json.loads(SHIPPED_CHECKPOINT.with_suffix(".json").read_text())
    assert sha256_file(SHIPPED_CHECKPOINT) == sidecar["sha256"]
    assert SHIPPED_CHECKPOINT.stat().st_size <= 25 * 2**20  # the limit for a shipped file
    model = load_checkpoint(SHIPPED_CHECKPOINT, sidecar["arch"])  # strict: every key, every shape
    assert make_config(sidecar["arch"]).to_flags() == sidecar["flags"] == model.config.to_flags()
    assert sidecar["weights"] == "ema" and sidecar["dataset"] == "fashion_mnist"
    # continued from an earlier run: both commands are recorded, and the steps add up
    lineage = sidecar.get("init_from")
    if lineage is not None:
        assert lineage["command"].startswith("diffsweep train-ddpm ") and len(lineage["sha256"]) == 64
        assert sidecar["total_steps"] == lineage["steps"] + sidecar["steps"]
    assert sidecar["command"].startswith("diffsweep train-ddpm ") and f"--steps {sidecar['steps']} " in sidecar["command"]
    assert SHIPPED_CHECKPOINT.with_suffix(".samples.png").is_file()
