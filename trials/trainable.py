"""The Ray Tune trainable: one trial = one (dataset, t, block(s), pool, head, hyper-parameters).

This is the only module in `trials` that talks to Ray Tune. Features come from the store; when a key
is missing (first use, or a corrupted file) it is computed exactly once cluster-wide
(`trials.coordinator.ensure_in_trial`). Pooled heads read the map's pooled cache, made once per
(t, block, pool) and shared by every trial, not the full map per batch.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray import tune

from trials.coordinator import ensure_in_trial, get_coordinator, read_pooled
from trials.features import BackboneSpec, DatasetSpec, FeatureRequest, FillOptions, dataset_splits
from trials.head_registry import REGISTRY
from trials.heads import param_count
from trials.store import CorruptFeatureFile, FeatureArray, FeatureStore
from trials.train_head import HeadTrainer, Recipe


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares (the searched values arrive in `config`)."""

    sweep: str
    backbone: BackboneSpec
    datasets: dict[str, DatasetSpec]
    fill: FillOptions
    noise_seed: int
    space_blocks: dict[int, tuple[int, ...]]  # t -> every block the space may read at t (one pass each)
    recipe: Recipe = field(default_factory=Recipe)
    max_spatial: int = 16
    numeric: str = "cpu-fp32"  # the sweep's numeric path (part of every feature key)
    space_pools: tuple[int, ...] = (1,)  # every pool the space may ask (one pass builds all caches)
    seed: int = 0
    extract_options: dict = field(default_factory=dict)
    space_draws: tuple[int, ...] = (1,)  # every noise-ensemble size the space may ask

    @property
    def store_root(self) -> str:
        return self.fill.store_root

    def request(self, dataset: str, split: str, t: int, blocks: tuple[int, ...] | None = None,
                draws: int = 1) -> FeatureRequest:
        """The request for every block the space reads at t (one U-Net pass covers them all), each
        map the mean over `draws` ε draws."""
        return FeatureRequest(self.backbone, self.datasets[dataset], split, (int(t),),
                              tuple(sorted(blocks or self.space_blocks.get(int(t), ()))), self.noise_seed,
                              self.max_spatial, self.numeric, int(draws))


def trial_maps(config: dict[str, Any]) -> list[tuple[int, int]]:
    """The (t, block) maps a trial reads: one, or several for a head that reads several."""
    head = config["head"]
    if REGISTRY[head].multi_map:
        return [(int(t), int(b)) for t, b in config[f"{head}.maps"]]
    return [(int(config["t"]), int(config["block"]))]


def trial_draws(config: dict[str, Any]) -> int:
    """The noise-ensemble size of a trial's features (absent: one draw, as before ensembles)."""
    return int(config.get("noise_draws", 1))


def head_hparams(config: dict[str, Any]) -> dict[str, Any]:
    head = config["head"]
    spec = REGISTRY[head]
    params = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith(head + ".") and k != f"{head}.maps"}
    if spec.pooled:
        params["pool"] = int(config["pool"])
    if spec.takes_maps:
        params["maps"] = [list(m) for m in trial_maps(config)]
    return params


def trial_device() -> str:
    return "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"


def load_split(setup: TrialSetup, dataset: str, split: str, maps: list[tuple[int, int]], pool: int | None = None,
               coordinator=None, device: str = "cpu", draws: int = 1) -> list[FeatureArray]:
    """Read the maps of one split (or, with `pool`, their pooled caches), computing once,
    cluster-wide, what is missing or corrupt (in this process when Ray is not running)."""
    store = FeatureStore(setup.store_root)
    if coordinator is None and ray.is_initialized():
        coordinator = get_coordinator(setup.sweep, setup.extract_options)
    out = []
    for t, block in maps:
        blocks = tuple(sorted(set(setup.space_blocks.get(t, ())) | {block}))
        request = setup.request(dataset, split, t, blocks, draws)
        key = request.key(t, block)
        try:
            array = store.read(key, verify=True)
        except (KeyError, CorruptFeatureFile):
            ensure_in_trial(coordinator, request, setup.fill, device)
            array = store.read(key, verify=True)
        if pool is not None:
            array = read_pooled(coordinator, store, request, t, block, pool, setup.space_pools)
        out.append(array)
    return out


# A trial checkpoint: the trainer's state (weights, optimiser, scheduler, epoch) and, apart, the epoch alone,
# which is all a superseded checkpoint keeps.
WEIGHTS_FILE = "trainer.pt"
EPOCH_FILE = "epoch.json"


def trial_pool(config: dict[str, Any]) -> int | None:
    """The pool a pooled head reads (its cache is what the trial loads), None for spatial heads."""
    return int(config["pool"]) if REGISTRY[config["head"]].pooled else None


def train_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune function trainable: reports val_acc / train_loss / epoch once per epoch, with a checkpoint."""
    device = trial_device()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    maps, pool, draws = trial_maps(config), trial_pool(config), trial_draws(config)
    train = load_split(setup, config["dataset"], "train", maps, pool, device=device, draws=draws)
    val = load_split(setup, config["dataset"], "val", maps, pool, device=device, draws=draws)
    num_classes = len(dataset_splits(setup.datasets[config["dataset"]])[0])
    trainer = HeadTrainer(config["head"], head_hparams(config), train, num_classes, setup.recipe, setup.seed, device)
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            restore_trainer_state(trainer, d, device)
    n_params = param_count(trainer.model)
    node = ray.get_runtime_context().get_node_id()  # where the trial ran (multi-node tests read it)
    for metrics in trainer.epochs(val):
        with tempfile.TemporaryDirectory() as d:
            torch.save(trainer.state_dict(), os.path.join(d, WEIGHTS_FILE))
            with open(os.path.join(d, EPOCH_FILE), "w") as f:
                json.dump({"epoch": trainer.epoch}, f)
            tune.report({**metrics, **learned_map_weights(trainer.model, maps), "head_params": n_params,
                         "node_id": node}, checkpoint=tune.Checkpoint.from_directory(d))


def restore_trainer_state(trainer: HeadTrainer, checkpoint_dir: str, device: str) -> None:
    """Resume from a trial checkpoint. A superseded checkpoint keeps only its epoch (the sweep drops the
    weights of all but the newest, see orchestrator/checkpoints.py); Tune restores one when its saved
    experiment state lagged behind the trial (a driver killed before the next snapshot reached storage).
    Training is deterministic given (seed, epoch), so replaying the epochs rebuilds that state (exactly on a
    CPU; on a GPU up to its non-deterministic kernels)."""
    weights = os.path.join(checkpoint_dir, WEIGHTS_FILE)
    if os.path.exists(weights):
        trainer.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
        return
    with open(os.path.join(checkpoint_dir, EPOCH_FILE)) as f:
        epoch = int(json.load(f)["epoch"])
    while trainer.epoch < epoch:  # no validation pass: it draws no random numbers, so skipping it is exact
        trainer.train_epoch()


def learned_map_weights(model: torch.nn.Module, maps: list[tuple[int, int]]) -> dict[str, str]:
    """A head that weighs its (t, block) maps (mixing) reports the weights with every result, as JSON
    [[t, block, weight], ...], so the driver can log them (MLflow heatmaps) without the checkpoint."""
    if not hasattr(model, "map_weights"):
        return {}
    weights = model.map_weights().detach().cpu().tolist()
    return {"map_weights": json.dumps([[t, b, round(w, 6)] for (t, b), w in zip(maps, weights)])}
