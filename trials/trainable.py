"""The Ray Tune trainable: one trial = one (dataset, t, block(s), pool, head, hyper-parameters).

This is the only module in `trials` that talks to Ray Tune. Features come from the store; when a key
is missing (first use, or a corrupted file) the sweep's coordinator extracts it exactly once.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray import tune

from trials.coordinator import get_coordinator
from trials.features import BackboneSpec, DatasetSpec, dataset_splits, read_features
from trials.heads import POOLED_HEADS, param_count
from trials.store import CorruptFeatureFile, FeatureArray, FeatureStore
from trials.train_head import HeadTrainer, Recipe


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares (the searched values arrive in `config`)."""

    sweep: str
    backbone: BackboneSpec
    datasets: dict[str, DatasetSpec]
    store_root: str
    noise_seed: int
    space_blocks: dict[int, tuple[int, ...]]  # t -> every block the space may read at t (one pass each)
    recipe: Recipe = field(default_factory=Recipe)
    max_spatial: int = 16
    seed: int = 0
    extract_options: dict = field(default_factory=dict)


def trial_maps(config: dict[str, Any]) -> list[tuple[int, int]]:
    """The (t, block) maps a trial reads: one, or several for the fusion head."""
    if config["head"] == "fusion":
        return [(int(t), int(b)) for t, b in config["fusion.maps"]]
    return [(int(config["t"]), int(config["block"]))]


def head_hparams(config: dict[str, Any]) -> dict[str, Any]:
    head = config["head"]
    params = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith(head + ".") and k != "fusion.maps"}
    if head in POOLED_HEADS:
        params["pool"] = int(config["pool"])
    return params


def load_split(setup: TrialSetup, dataset: str, split: str, maps: list[tuple[int, int]],
               coordinator=None) -> list[FeatureArray]:
    """Read the maps of one split, extracting (once, cluster-wide) what is missing or corrupt."""
    store = FeatureStore(setup.store_root)
    spec = setup.datasets[dataset]
    out = []
    for t, block in maps:
        args = (store, setup.backbone, spec, split, t, block, setup.noise_seed, setup.max_spatial)
        try:
            out.append(read_features(*args))
            continue
        except (KeyError, CorruptFeatureFile):
            pass
        coordinator = coordinator or get_coordinator(setup.sweep, setup.store_root, setup.extract_options)
        blocks = setup.space_blocks.get(t, (block,))
        ray.get(coordinator.ensure.remote(setup.backbone, spec, split, t, tuple(sorted(set(blocks) | {block})),
                                          setup.noise_seed, setup.max_spatial, True))
        out.append(read_features(*args))
    return out


def train_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune function trainable: reports val_acc / train_loss / epoch once per epoch, with a checkpoint."""
    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    maps = trial_maps(config)
    train = load_split(setup, config["dataset"], "train", maps)
    val = load_split(setup, config["dataset"], "val", maps)
    num_classes = len(dataset_splits(setup.datasets[config["dataset"]])[0])
    trainer = HeadTrainer(config["head"], head_hparams(config), train, num_classes, setup.recipe, setup.seed, device)
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            trainer.load_state_dict(torch.load(os.path.join(d, "trainer.pt"), map_location=device, weights_only=True))
    n_params = param_count(trainer.model)
    node = ray.get_runtime_context().get_node_id()  # where the trial ran (multi-node tests read it)
    for metrics in trainer.epochs(val):
        with tempfile.TemporaryDirectory() as d:
            torch.save(trainer.state_dict(), os.path.join(d, "trainer.pt"))
            tune.report({**metrics, "head_params": n_params, "node_id": node},
                        checkpoint=tune.Checkpoint.from_directory(d))
