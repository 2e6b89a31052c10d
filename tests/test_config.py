"""The shipped search spaces parse and validate; the YAML reads like suggest_* calls."""

from pathlib import Path

import optuna
import pytest

from orchestrator.config import load_config
from orchestrator.search import grid_points, suggest_config

SPACES = sorted((Path(__file__).resolve().parent.parent / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_shipped_spaces_validate(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        config = suggest_config(study.ask(), cfg.space)
        assert config["head"] in cfg.space.head
        extra = {k.split(".")[0] for k in config if "." in k}
        assert extra <= {config["head"]}  # only the chosen head's parameters appear


def test_grid_enumerates_every_point():
    cfg = load_config(Path(__file__).resolve().parent.parent / "search_spaces" / "quickstart.yaml")
    points = grid_points(cfg.space)
    s = cfg.space
    expected = len(s.t) * len(s.block) * len(s.pool) * (1 + len(s.head["mlp"]["hidden"]))
    assert len(points) == expected
    assert len({tuple(sorted(p.items())) for p in points}) == expected


def test_a_validation_bar_is_one_for_every_dataset_or_per_dataset():
    from orchestrator.config import Selection

    assert Selection(min_val_acc=0.94).bar("cub") == 0.94
    per_dataset = Selection(min_val_acc={"cub": 0.8, "flowers102": 0.98})
    assert (per_dataset.bar("cub"), per_dataset.bar("flowers102"), per_dataset.bar("nabirds")) == (0.8, 0.98, None)
    assert Selection().bar("cub") is None


def test_a_head_reading_several_pooled_maps_is_suggested_a_map_set_and_a_pool():
    """`concat` reads the pooled caches of a listed map set: the sampler picks the set and the pool;
    the grid has one point per set × pool."""
    from orchestrator.config import Space

    space = Space(t=[10], block=[8], pool=[2, 4], head={"concat": {"hidden": [32]}},
                  concat_maps=[[[10, 8], [10, 9]], [[10, 8], [25, 8]]])
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(4):
        config = suggest_config(study.ask(), space)
        assert config["pool"] in (2, 4)
        assert config["concat.maps"] in ([[10, 8], [10, 9]], [[10, 8], [25, 8]])
    points = grid_points(space)
    assert sorted((p["concat.set"], p["pool"]) for p in points) == [(0, 2), (0, 4), (1, 2), (1, 4)]
    with pytest.raises(ValueError, match="head 'concat' needs concat_maps"):
        Space(t=[10], block=[8], head={"concat": {}})
