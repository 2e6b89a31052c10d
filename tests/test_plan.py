"""`diffsweep plan` on the paper's FGVC space over miniature copies of the six published layouts."""

import json
from pathlib import Path

import pytest
import yaml

from fgvc_fixtures import MAKERS
from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config
from orchestrator.plan import check_space, sweep_plan
from orchestrator.sweep import trial_setup
from trials.features import dataset_splits

ROOT = Path(__file__).resolve().parents[1]
SIX = ["cub", "flowers102", "aircraft", "stanford_cars", "stanford_dogs", "nabirds"]


def paper_space(tmp_path: Path, roots: dict[str, str] | None = None) -> Path:
    """search_spaces/paper_fgvc.yaml as shipped, pointed at local folders (random weights of its U-Net)."""
    spec = yaml.safe_load((ROOT / "search_spaces/paper_fgvc.yaml").read_text())
    spec["checkpoint"] = {"arch": spec["checkpoint"]["arch"], "random_weights": True}
    if roots is not None:
        spec["datasets"] = [{"name": d["name"], "root": roots[d["name"]]} for d in spec["datasets"]]
    spec.update(store={**spec["store"], "path": str(tmp_path / "features")}, storage_path=str(tmp_path / "ray"),
                export_dir=str(tmp_path / "exported"), tracking={"uri": f"sqlite:///{tmp_path / 'mlruns.db'}"})
    path = tmp_path / "paper_fgvc.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_plan_json_matches_the_six_layouts(tmp_path, capsys):
    roots = {name: str(MAKERS[name](tmp_path / name)) for name in SIX}
    space = paper_space(tmp_path, roots)
    assert main(["plan", str(space), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)

    cfg = load_config(space)
    setup = trial_setup(cfg)
    ts, blocks = cfg.space.t, cfg.space.block
    assert plan["blocks"]["24"] == {"channels": 1024, "native": 16, "stored": 16, "bytes_per_image": 512 * 1024,
                                    "pooled_by_store": False}
    assert plan["blocks"]["30"]["native"] == 64 and plan["blocks"]["30"]["pooled_by_store"]
    per_image = sum(b["bytes_per_image"] for b in plan["blocks"].values()) * len(ts)
    filled_images = 0
    for name in SIX:
        _, splits = dataset_splits(setup.datasets[name])
        images = {s: len(v) for s, v in splits.items()}
        assert plan["datasets"][name]["images"] == images  # what the loaders find in the layout
        assert plan["datasets"][name]["sizes"] == "files"
        filled_images += images["train"] + images["val"]
    assert plan["image_passes"] == filled_images * len(ts)
    fill = plan["feature_bytes"]["fill"]
    assert filled_images * per_image <= fill <= 1.05 * filled_images * per_image  # maps + Arrow framing
    assert len(plan["feature_bytes"]["per_map"]) == len(ts) * len(blocks)
    assert plan["feature_bytes"]["missing"] == fill  # nothing stored yet
    assert plan["trials"] == cfg.search.num_samples * len(SIX)
    assert plan["head_epochs_max"] == plan["trials"] * 28
    assert plan["checkpoint_bytes"]["per_trial_max"] > 0 and plan["pooled_cache_bytes"] > 0
    # a GPU fill (extract_gpu: 1): weights, two batches of maps, the interpreter; no activations on the host
    assert 2 * 2 ** 30 < plan["extract_task_peak_ram_bytes"] < 8 * 2 ** 30


def test_published_sizes_plan_a_sweep_before_the_data_is_here(tmp_path, capsys):
    space = paper_space(tmp_path)  # roots under /mnt/diffsweep, not on this machine
    with pytest.raises(Exception):
        sweep_plan(load_config(space))
    assert main(["plan", str(space), "--json", "--published-sizes"]) == 0
    plan = json.loads(capsys.readouterr().out)
    cub = plan["datasets"]["cub"]
    assert cub["sizes"] == "published" and cub["classes"] == 200
    assert cub["images"]["train"] + cub["images"]["val"] == 5994 and cub["images"]["test"] == 5794
    assert plan["datasets"]["flowers102"]["images"] == {"train": 1020, "val": 1020, "test": 6149}
    assert plan["datasets"]["nabirds"]["classes"] == 555


def test_run_refuses_a_store_without_room_in_one_line(tmp_path):
    plan = {"feature_bytes": {"missing": 3 * 2 ** 30, "test_max": 2 ** 30}, "pooled_cache_bytes": 2 ** 30,
            "store_free_bytes": 2 ** 30, "store": str(tmp_path)}
    with pytest.raises(ConfigError) as err:
        check_space(plan)
    message = str(err.value)
    assert "\n" not in message and "1.00 GiB free" in message and "5.00 GiB" in message
    check_space({**plan, "store_free_bytes": 6 * 2 ** 30})  # room enough: no error


def test_noise_draws_are_costed_as_their_own_keys(tmp_path):
    """Each ensemble size is its own set of keys, and a k-draw feature costs k image passes."""
    from tests.spaces import tiny_space

    one = sweep_plan(load_config(tiny_space(tmp_path)))
    both = sweep_plan(load_config(tiny_space(tmp_path), {"space.noise_draws": [1, 2]}))
    assert both["image_passes"] == 3 * one["image_passes"]
    assert both["feature_bytes"]["fill"] == 2 * one["feature_bytes"]["fill"]
    assert set(both["feature_bytes"]["per_map"]) == set(one["feature_bytes"]["per_map"]) | \
        {f"{m}/k2" for m in one["feature_bytes"]["per_map"]}
