"""The searcher on its own: per-dataset studies, pruned vs complete, optional RDB storage."""

from pathlib import Path

import optuna

from orchestrator.config import load_config
from orchestrator.search import PerDatasetOptunaSearch
from tests.spaces import tiny_space


def searcher(tmp: Path, **search) -> PerDatasetOptunaSearch:
    space = tiny_space(tmp, name="srch", datasets=[{"name": "digits"}, {"name": "fashion_mnist"}], **search)
    return PerDatasetOptunaSearch(load_config(space))


def test_studies_live_in_the_optuna_storage_and_record_pruned(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = searcher(tmp_path, optuna_storage=storage, num_samples=2)
    configs = {tid: s.suggest(tid) for tid in ("a", "b", "c", "d")}
    assert s.suggest("e") == "FINISHED"
    assert sorted(c["dataset"] for c in configs.values()) == ["digits", "digits", "fashion_mnist", "fashion_mnist"]
    for tid in configs:
        s.on_trial_result(tid, {"epoch": 1, "val_acc": 0.5})
    s.on_trial_complete("a", {"epoch": 3, "val_acc": 0.9})  # ran to max_t
    s.on_trial_complete("b", {"epoch": 2, "val_acc": 0.4})  # stopped by ASHA after epoch 2 of 3
    s.on_trial_complete("c", error=True)
    names = sorted(optuna.get_all_study_names(storage))
    assert names == ["srch/digits", "srch/fashion_mnist"]  # one study per dataset, in the database
    studies = {name: optuna.load_study(study_name=name, storage=storage) for name in names}
    assert [len(st.trials) for st in studies.values()] == [2, 2]
    states = sorted(t.state.name for st in studies.values() for t in st.trials)
    assert states == sorted(["COMPLETE", "PRUNED", "FAIL", "RUNNING"])  # "d" is still running
    pruned = next(t for st in studies.values() for t in st.trials if t.state.name == "PRUNED")
    assert pruned.intermediate_values == {1: 0.5, 2: 0.4}  # up to its last (low-fidelity) value


def test_warm_start_is_tried_first(tmp_path):
    s = searcher(tmp_path, warm_start=[{"head": "linear", "t": 200, "block": 8, "pool": 2, "linear.lr": 0.005}])
    first = s.suggest("x")
    assert {k: first[k] for k in ("head", "t", "block", "pool", "linear.lr")} == \
        {"head": "linear", "t": 200, "block": 8, "pool": 2, "linear.lr": 0.005}


def test_grid_with_warm_starts_still_covers_every_grid_point(tmp_path):
    import json

    from orchestrator.search import grid_points
    warm = [{"head": "linear", "t": 200, "block": 8, "pool": 2, "linear.lr": 0.005},  # lr off the grid midpoint
            {"head": "mlp", "t": 10, "block": 4, "pool": 1, "mlp.hidden": 32}]  # a grid point
    cfg = load_config(tiny_space(tmp_path, name="gw", datasets=[{"name": "digits"}],
                                 heads={"linear": {"lr": {"low": 0.001, "high": 0.01, "log": True}},
                                        "mlp": {"hidden": [32]}},
                                 sampler="grid", warm_start=warm))
    s = PerDatasetOptunaSearch(cfg)
    seen = []
    while (config := s.suggest(f"trial-{len(seen)}")) != "FINISHED":
        seen.append(json.dumps({k: v for k, v in config.items() if k != "dataset"}, sort_keys=True))
        s.on_trial_complete(f"trial-{len(seen) - 1}", {"epoch": 3, "val_acc": 0.5})
    grid = {json.dumps(g, sort_keys=True) for g in grid_points(cfg.space)}
    assert len(seen) == len(set(seen)) == len(grid) + 1  # every grid point once, plus the extra warm start
    assert grid <= set(seen) and json.dumps(warm[0], sort_keys=True) in seen


def test_a_near_identical_suggestion_is_not_run(tmp_path):
    """Two warm starts that differ only by lr 0.0089491 vs 0.0089498 (what TPE once proposed at the same
    categorical point): the second is told FAIL as a twin of the first and not counted in the budget."""
    point = {"head": "linear", "t": 200, "block": 8, "pool": 2}
    warm = [{**point, "linear.lr": 0.0089491}, {**point, "linear.lr": 0.0089498}]
    cfg = load_config(tiny_space(tmp_path, name="tw", datasets=[{"name": "digits"}], num_samples=3,
                                 heads={"linear": {"lr": {"low": 0.0001, "high": 0.1, "log": True}}},
                                 warm_start=warm))
    s = PerDatasetOptunaSearch(cfg)
    configs = [s.suggest(f"t{i}") for i in range(3)]
    assert s.suggest("t3") == "FINISHED"  # 3 trials run: the twin did not use one of them
    study = s.studies["digits"]
    twins = [t for t in study.trials if "twin_of" in t.user_attrs]
    assert [(t.number, t.state.name, t.user_attrs["twin_of"]) for t in twins] == [(1, "FAIL", 0)]
    assert configs[0]["linear.lr"] == 0.0089491
    lrs = [c["linear.lr"] for c in configs]
    runs = [(c["t"], c["block"], c["pool"], c["linear.lr"]) for c in configs]
    assert len(set(runs)) == 3 and 0.0089498 not in lrs
