"""The shipped Fashion-MNIST result reproduces from its exported files: the check of the README's
"Does it work?" section, on the real test set from Debian's dataset-fashion-mnist."""

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from tests.conftest import fashion_mnist_available

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fashion_mnist" / "fashion_mnist.yaml"


@pytest.mark.skipif(not fashion_mnist_available(), reason="needs apt-get install dataset-fashion-mnist")
def test_shipped_example_reproduces_its_test_accuracy(capsys):
    selection = yaml.safe_load(EXAMPLE.read_text())["selection"]
    assert selection["chosen_on"] == "validation" and selection["test_n"] == 10000
    assert main(["evaluate", "--config", str(EXAMPLE), "--split", "test"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 10000
    assert out["accuracy"] == pytest.approx(selection["test_acc"], abs=1e-4)
    assert out["accuracy"] >= 0.93  # the target
