"""The sweep's searcher and Tune's schedulers, driven in-process, with heads that really train.

`Trials` trains one head per configuration on in-memory pooled features (search_data), exactly as a
sweep trial does (trials.train_head.HeadTrainer, the sweep's recipe and seed, trials.trainable's
head_hparams), and reports val and judge accuracy after every epoch. A configuration's curve is
cached by its exact value: a second trial with the identical config (the grid's point, the same
random draw in random and random + ASHA) reuses it, an ASHA-stopped trial is a prefix of the full
run (the cosine schedule spans max_t either way) and a longer run resumes training from the cached
prefix by replaying it (training is deterministic for a (config, seed), checked by the benchmark).

`run_search` drives orchestrator.search.PerDatasetOptunaSearch behind Tune's ConcurrencyLimiter
with Tune's ASHAScheduler (or FIFOScheduler: no early stopping) the way Tune's controller does:
scheduler.on_trial_result first, searcher.on_trial_result only if the trial continues, on STOP or at
max_t on_trial_complete for both. Running trials advance one epoch each in turn. It stops when the
searcher is finished or when `budget` head-epochs are spent (trials still running then are cut and
do not count as completed). The incumbent is chosen as orchestrator.select chooses: best final
val_acc among trials that ran to max_t, ties to the smaller head, then the earlier trial.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np


def config_key(config: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in config.items()))


@dataclass
class Curve:
    val: list = field(default_factory=list)
    judge: list = field(default_factory=list)
    params: int = 0


class Trials:
    """Per-epoch (val_acc, judge_acc) of a configuration, trained on demand and cached."""

    def __init__(self, data, max_t: int, batch_size: int = 128, seed: int = 0):
        from trials.train_head import Recipe

        self.data, self.max_t, self.seed = data, max_t, seed
        self.recipe = Recipe("adamw", max_t, batch_size)
        self.curves: dict[tuple, Curve] = {}
        self.live: dict[tuple, object] = {}  # config key -> HeadTrainer of a trial still running
        self.trained_epochs = 0  # real training work (a replayed prefix counts again)

    def trainer(self, config: dict):
        from trials.train_head import HeadTrainer
        from trials.trainable import head_hparams

        arrays = self.data.maps[(int(config["t"]), int(config["block"]), int(config["pool"]))]
        return HeadTrainer(config["head"], head_hparams(config), [arrays.train], self.data.num_classes, self.recipe,
                           self.seed), arrays

    def train_curve(self, config: dict, epochs: int) -> list[tuple[float, float]]:
        """A fresh head trained `epochs` epochs (no cache): the determinism check."""
        trainer, arrays = self.trainer(config)
        out = []
        for _ in range(epochs):
            trainer.train_epoch()
            out.append((trainer.accuracy([arrays.val]), trainer.accuracy([arrays.judge])))
        return out

    def at(self, config: dict, epoch: int) -> tuple[float, float]:
        """(val_acc, judge_acc) after `epoch` epochs of this configuration."""
        key = config_key(config)
        curve = self.curves.setdefault(key, Curve())
        while len(curve.val) < epoch:
            trainer = self.live.get(key)
            if trainer is None or trainer.epoch != len(curve.val):
                trainer, _ = self.trainer(config)  # replay the cached prefix (deterministic)
                while trainer.epoch < len(curve.val):
                    trainer.train_epoch()
                    self.trained_epochs += 1
                self.live[key] = trainer
            arrays = self.data.maps[(int(config["t"]), int(config["block"]), int(config["pool"]))]
            trainer.train_epoch()
            self.trained_epochs += 1
            curve.val.append(trainer.accuracy([arrays.val]))
            curve.judge.append(trainer.accuracy([arrays.judge]))
            curve.params = sum(p.numel() for p in trainer.model.parameters())
        return curve.val[epoch - 1], curve.judge[epoch - 1]

    def save(self, path: str) -> None:
        """The cached curves (not the heads) to a file, so a rerun with other search settings reuses them."""
        import pickle
        with open(path, "wb") as f:
            pickle.dump({k: (c.val, c.judge, c.params) for k, c in self.curves.items()}, f)

    def load(self, path: str) -> int:
        import pickle
        from pathlib import Path
        if not Path(path).is_file():
            return 0
        with open(path, "rb") as f:  # our own file, written by save()
            for k, (val, judge, params) in pickle.load(f).items():
                self.curves[k] = Curve(list(val), list(judge), params)
        return len(self.curves)

    def release(self, config: dict) -> None:
        """The trial ended: drop its head (the curve stays cached)."""
        self.live.pop(config_key(config), None)

    def params(self, config: dict) -> int:
        return self.curves[config_key(config)].params


@dataclass
class Outcome:
    trace: np.ndarray  # judge accuracy of the incumbent after each head-epoch spent (nan: none yet)
    val_trace: np.ndarray
    epochs: int
    trials: int
    completed: int
    best: dict | None
    best_val: float
    best_judge: float


def run_search(cfg, trials: Trials, asha: bool, budget: int | None = None) -> Outcome:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
    from ray.tune.search import ConcurrencyLimiter, Searcher

    from orchestrator.search import PerDatasetOptunaSearch

    searcher = PerDatasetOptunaSearch(cfg)
    limiter = ConcurrencyLimiter(searcher, cfg.search.max_concurrent)
    a = cfg.search.asha
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=a.max_t, grace_period=a.grace_period,
                               reduction_factor=a.reduction_factor) if asha else FIFOScheduler())
    scheduler.set_search_properties(cfg.search.metric, "max")
    created, running, done, spent = 0, [], 0, 0
    completed, best, best_rank = 0, None, None
    trace, val_trace = [], []
    while budget is None or spent < budget:
        while created < searcher.total_budget:  # Tune asks for a new trial whenever the limiter has room
            trial_id = f"trial_{created:05d}"
            config = limiter.suggest(trial_id)
            if config is None or config == Searcher.FINISHED:
                break
            trial = SimpleNamespace(trial_id=trial_id)
            scheduler.on_trial_add(None, trial)
            running.append({"trial": trial, "config": config, "epoch": 0, "order": created})
            created += 1
        if not running:
            break
        for r in list(running):  # each running trial reports one more epoch, in turn
            if budget is not None and spent >= budget:
                break
            r["epoch"] += 1
            spent += 1
            val, judge = trials.at(r["config"], r["epoch"])
            result = {"epoch": r["epoch"], "val_acc": val, "training_iteration": r["epoch"],
                      "trial_id": r["trial"].trial_id}
            decision = scheduler.on_trial_result(None, r["trial"], result)
            if decision == TrialScheduler.STOP or r["epoch"] >= a.max_t:
                scheduler.on_trial_complete(None, r["trial"], result)
                limiter.on_trial_complete(r["trial"].trial_id, result=result)
                trials.release(r["config"])
                running.remove(r)
                done += 1
                if r["epoch"] >= a.max_t:
                    completed += 1
                    rank = (val, -trials.params(r["config"]), -r["order"])
                    if best_rank is None or rank > best_rank:
                        best_rank, best = rank, {**r["config"], "_val": val, "_judge": judge}
            else:
                limiter.on_trial_result(r["trial"].trial_id, result)
            trace.append(best["_judge"] if best else np.nan)
            val_trace.append(best["_val"] if best else np.nan)
    for r in running:
        trials.release(r["config"])
    return Outcome(np.array(trace), np.array(val_trace), spent, created, completed, best,
                   best["_val"] if best else np.nan, best["_judge"] if best else np.nan)


def run_grid(points: list[dict], trials: Trials, dataset: str) -> Outcome:
    """Every point to max_t, in grid order; the incumbent chosen as in run_search."""
    best, best_rank, trace, val_trace = None, None, [], []
    for order, point in enumerate(points):
        config = {"dataset": dataset, **point}
        for epoch in range(1, trials.max_t + 1):
            val, judge = trials.at(config, epoch)
            if epoch == trials.max_t:
                rank = (val, -trials.params(config), -order)
                if best_rank is None or rank > best_rank:
                    best_rank, best = rank, {**config, "_val": val, "_judge": judge}
            trace.append(best["_judge"] if best else np.nan)
            val_trace.append(best["_val"] if best else np.nan)
        trials.release(config)
    return Outcome(np.array(trace), np.array(val_trace), len(trace), len(points), len(points), best,
                   best["_val"], best["_judge"])
