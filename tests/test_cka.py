"""Linear CKA (minibatch unbiased HSIC) and `diffsweep cka` end to end on a tiny spec."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.cli import main
from orchestrator.plots import matrix_heatmap
from orchestrator.tracking import SweepRun
from tests.spaces import tiny_space
from trials.cka import Rows, cka_matrix, full_batch_linear_cka, minibatch_linear_cka
from trials.store import FeatureArray

PNG = b"\x89PNG\r\n\x1a\n"


def features(n=2000, d=64, noise=0.5, seed=0):
    """X with a decaying spectrum and a nonlinear, noisy Y = tanh(XW + ε) correlated with it."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -2, d)
    x = torch.randn(n, d, generator=g) * spectrum
    y = torch.tanh(x @ torch.randn(d, d, generator=g) / 8 + noise * torch.randn(n, d, generator=g) * spectrum)
    return x, y


def assert_valid_png(path):
    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as im:
        im.verify()


def test_cka_of_a_set_with_itself_is_one():
    x, _ = features(n=600)
    assert minibatch_linear_cka(x, x, batch_size=128) == pytest.approx(1.0, abs=1e-6)
    assert full_batch_linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)


def test_invariant_to_orthogonal_transform_and_isotropic_scaling():
    x, y = features(n=1000)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(1)))
    base_mb, base_fb = minibatch_linear_cka(x, y, 200), full_batch_linear_cka(x, y)
    for transformed in (x @ q, 7.5 * x, 0.01 * (x @ q)):
        assert minibatch_linear_cka(transformed, y, 200) == pytest.approx(base_mb, abs=1e-5)
        assert full_batch_linear_cka(transformed, y) == pytest.approx(base_fb, abs=1e-6)  # float32 inputs
    assert minibatch_linear_cka(x + 3.0, y, 200) == pytest.approx(base_mb, abs=1e-5)  # HSIC_u ignores a shift


@pytest.mark.parametrize("noise", [0.1, 1.0])
def test_minibatch_estimate_agrees_with_full_batch(noise):
    x, y = features(noise=noise)
    full = full_batch_linear_cka(x, y)
    assert 0.5 < full < 0.95  # correlated, not identical
    for batch_size in (100, 256):
        assert minibatch_linear_cka(x, y, batch_size) == pytest.approx(full, abs=0.01)


def test_cka_matrix_streams_feature_arrays_reproducibly():
    x, y = features(n=700, d=16)
    z = torch.randn(700, 16, generator=torch.Generator().manual_seed(2))
    as_maps = [v.reshape(700, 4, 2, 2).numpy().astype(np.float16) for v in (x, y, z)]
    ids = [str(i) for i in range(700)]
    arrays = [FeatureArray([a[:300], a[300:]], np.zeros(700), ids) for a in as_maps]  # two stored parts
    m = cka_matrix(arrays, batch_size=128, seed=3)
    assert m.shape == (3, 3) and np.allclose(m, m.T) and np.allclose(np.diag(m), 1)
    assert np.array_equal(m, cka_matrix(arrays, batch_size=128, seed=3))
    assert m[0, 1] > 0.5 and abs(m[0, 2]) < 0.1  # y follows x, z does not
    rows = cka_matrix([Rows(v) for v in as_maps[:2]], [Rows(as_maps[2])], batch_size=128, seed=3)
    assert rows.shape == (2, 1) and np.allclose(rows[:, 0], m[:2, 2], atol=1e-6)
    with pytest.raises(ValueError):
        cka_matrix([Rows(x), Rows(x[:10])])
    with pytest.raises(ValueError):
        cka_matrix([Rows(x[:3])])


def test_heatmaps_are_valid_pngs(tmp_path):
    x, y = features(n=400, d=16)
    m = cka_matrix([Rows(x), Rows(y)], batch_size=100)
    path = matrix_heatmap(m, ["x", "y"], tmp_path / "m.png", "CKA")
    assert_valid_png(path)


@pytest.mark.parametrize("flags", [["--blocks", "99", "--t", "10"], ["--blocks", "4", "--t", "1000"],
                                   ["--blocks", "4,x", "--t", "10"], ["--blocks", "4", "--t", "10", "--against", "nope.pt"]])
def test_cka_command_bad_input_is_one_line(tmp_path, capsys, flags):
    space = tiny_space(tmp_path)
    assert main(["cka", str(space), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffsweep: error: --") and "\n" not in err
    assert not any((tmp_path / d).exists() for d in ("features", "exported", "mlruns.db"))


@pytest.mark.slow
def test_cka_command_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's sqlite default artifact root is ./mlruns
    space = tiny_space(tmp_path)
    out = tmp_path / "cka"
    assert main(["cka", str(space), "--blocks", "4,8", "--t", "10,200", "--out", str(out)]) == 0
    table = pd.read_parquet(out / "cka_digits_val.parquet")
    assert {"a", "b", "t_a", "t_b", "block_a", "block_b", "cka"} <= set(table.columns)
    assert len(table) == 16  # every pair of the 2 t × 2 block feature sets
    diagonal = table[(table.t_a == table.t_b) & (table.block_a == table.block_b)]
    assert len(diagonal) == 4 and np.allclose(diagonal.cka, 1, atol=1e-4)
    off = table[(table.t_a == 10) & (table.t_b == 10) & (table.block_a == 4) & (table.block_b == 8)].cka.item()
    assert 0 < off < 1
    for name in ("digits_blocks_t10.png", "digits_blocks_t200.png", "digits_t_block4.png", "digits_t_block8.png"):
        assert_valid_png(out / name)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")  # no sweep ran: a run "<name>-cka"
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [r.info.run_name for r in runs] == ["tiny-cka"]
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id, "cka")}
    assert "cka/digits_blocks_t10.png" in logged and "cka/cka_digits_val.parquet" in logged

    # after a sweep: artifacts go to its parent run; --against random adds the cross-model matrices
    parent = SweepRun(f"sqlite:///{tmp_path / 'mlruns.db'}", "tiny", "tiny")
    (tmp_path / "ray" / "tiny").mkdir(parents=True)
    (tmp_path / "ray" / "tiny" / "diffsweep_sweep.json").write_text(json.dumps({"parent_run_id": parent.run_id}))
    assert main(["cka", str(space), "--blocks", "4,8", "--t", "10", "--against", "random", "--out", str(out)]) == 0
    assert_valid_png(out / "digits_cross_t10.png")
    cross = pd.read_parquet(out / "cka_digits_val.parquet").query("a != b")
    assert len(cross) == 8 and set(cross.b) | set(cross.a) == {"adm-28-small-fashion_mnist", "random:0"}
    assert ((cross.cka > 0) & (cross.cka < 1)).all()
    logged = {a.path for a in client.list_artifacts(parent.run_id, "cka")}
    assert "cka/digits_cross_t10.png" in logged
    assert len(client.search_runs([client.get_experiment_by_name("tiny").experiment_id])) == 2  # no new run
