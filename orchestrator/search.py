"""A Ray Tune searcher holding one Optuna study per dataset.

Why not Tune's OptunaSearch: it keeps one study for the whole sweep (so one dataset's scores would
steer another dataset's sampler) and tells ASHA-stopped trials to Optuna as COMPLETE with their
low-fidelity value (which biases TPE towards configs that look good early). Here each dataset has its
own seeded study, a trial stopped before `max_t` is told as PRUNED (Optuna keeps its last
intermediate value), an errored trial as FAIL, and only trials that ran to `max_t` as COMPLETE.
"""

from __future__ import annotations

import itertools
import math
import pickle
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from orchestrator.config import Range, Space, SweepConfig
from trials.head_registry import REGISTRY

optuna.logging.set_verbosity(optuna.logging.WARNING)


def suggest_config(trial: optuna.Trial, space: Space) -> dict[str, Any]:
    """Define-by-run: head first, then only the parameters that head uses."""
    head = trial.suggest_categorical("head", list(space.head))
    config: dict[str, Any] = {"head": head}
    spec = REGISTRY[head]
    if spec.multi_map:
        sets = space.map_sets(head)
        index = trial.suggest_categorical(f"{head}.set", list(range(len(sets))))
        maps = [list(m) for m in sets[index]]
        config.update({f"{head}.maps": maps, "t": maps[0][0], "block": maps[0][1]})
    else:
        config["t"] = trial.suggest_categorical("t", space.t)
        config["block"] = trial.suggest_categorical("block", space.block)
    if spec.pooled:
        config["pool"] = trial.suggest_categorical("pool", space.pool)
    if space.noise_draws != [1]:  # absent = 1 draw, so spaces without ensembles keep their configs
        config["noise_draws"] = trial.suggest_categorical("noise_draws", space.noise_draws)
    for name, spec in space.head[head].items():
        key = f"{head}.{name}"
        if isinstance(spec, Range):
            if spec.type == "int":
                config[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)
            else:
                config[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
        else:
            config[key] = trial.suggest_categorical(key, spec)
    return config


def grid_points(space: Space) -> list[dict[str, Any]]:
    """Every configuration of the space, for the exhaustive baseline. Numeric ranges are held at
    their (geometric, for log ranges) midpoint; categorical lists are enumerated."""
    points = []
    for head, params in space.head.items():
        fixed = {f"{head}.{k}": (math.sqrt(v.low * v.high) if v.log else (v.low + v.high) / 2)
                 for k, v in params.items() if isinstance(v, Range)}
        fixed = {k: (round(v) if params[k.split(".", 1)[1]].type == "int" else v) for k, v in fixed.items()}
        listed = {f"{head}.{k}": v for k, v in params.items() if not isinstance(v, Range)}
        pools = [{"pool": p} for p in space.pool] if REGISTRY[head].pooled else [{}]
        if REGISTRY[head].multi_map:
            maps = [{f"{head}.set": i} for i in range(len(space.map_sets(head)))]
        else:
            maps = [{"t": t, "block": b} for t, b in itertools.product(space.t, space.block)]
        base = [{**m, **p} for m, p in itertools.product(maps, pools)]
        draws = [{"noise_draws": k} for k in space.noise_draws] if space.noise_draws != [1] else [{}]
        for b, k in itertools.product(base, draws):
            for values in itertools.product(*listed.values()):
                points.append({"head": head, **b, **k, **dict(zip(listed, values)), **fixed})
    return points


# Two suggestions closer than this (per float parameter, as a fraction of its range's width, in log
# space for log ranges) with every other parameter equal train the same head: TPE proposed lr
# 0.0089498 after 0.0089491 at the same (t, block, pool). Such a twin is not run, and not counted.
TWIN_TOLERANCE = 0.005
MAX_RESAMPLES = 10


def is_twin(params: dict[str, Any], other: dict[str, Any], distributions: dict[str, Any]) -> bool:
    if params.keys() != other.keys():
        return False
    for name, value in params.items():
        dist = distributions[name]
        if isinstance(dist, optuna.distributions.FloatDistribution):
            f = math.log if dist.log else float
            if abs(f(value) - f(other[name])) > TWIN_TOLERANCE * (f(dist.high) - f(dist.low)):
                return False
        elif value != other[name]:
            return False
    return True


def find_twin(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """The number of an earlier trial (running, pruned or complete) this one would repeat."""
    for other in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.PRUNED,
                                                          TrialState.COMPLETE)):
        if other.number != trial.number and is_twin(trial.params, other.params, trial.distributions):
            return other.number
    return None


# The TPE sampler's options, chosen on digits (benchmarks/search_efficiency.py). `group` makes the
# multivariate TPE model the define-by-run space (each head's own parameters) jointly; Optuna's
# default (constant_liar on) already covers the concurrent trials.
TPE_OPTIONS: dict[str, Any] = {"n_startup_trials": 5, "multivariate": True, "group": True}


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        with warnings.catch_warnings():  # `group` is marked experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, **TPE_OPTIONS)
    # "grid" enqueues every point (see grid_points), so its sampler only ever replays them.
    return optuna.samplers.RandomSampler(seed=seed)


class PerDatasetOptunaSearch(Searcher):
    def __init__(self, cfg: SweepConfig):
        super().__init__(metric=cfg.search.metric, mode="max")
        self.space = cfg.space
        self.max_t = cfg.epochs
        self.storage = cfg.search.optuna_storage
        self.sweep = cfg.name
        self.studies: dict[str, optuna.Study] = {}
        self.budget: dict[str, int] = {}
        grid = grid_points(cfg.space) if cfg.search.sampler == "grid" else []
        for i, d in enumerate(cfg.datasets):
            study = optuna.create_study(study_name=f"{cfg.name}/{d.name}", storage=self.storage,
                                        sampler=make_sampler(cfg.search.sampler, cfg.search.seed + i),
                                        direction="maximize", load_if_exists=True)
            if not study.trials:  # a fresh study: enqueue warm starts (and the grid) once
                for point in list(cfg.search.warm_start) + grid:
                    study.enqueue_trial(point, skip_if_exists=True)
            self.studies[d.name] = study
            # grid: every point once, plus the warm starts that are not grid points themselves
            extra = [w for w in cfg.search.warm_start if w not in grid]
            self.budget[d.name] = len(grid) + len(extra) if grid else cfg.search.num_samples
        self.asked = {d: 0 for d in self.studies}
        self.live: dict[str, tuple[str, int]] = {}  # Tune trial id -> (dataset, Optuna trial number)
        self._handles: dict[str, optuna.Trial] = {}  # not saved: rebuilt from `live` after a restore

    @property
    def total_budget(self) -> int:
        return sum(self.budget.values())

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        open_datasets = [d for d in self.studies if self.asked[d] < self.budget[d]]
        if not open_datasets:
            return Searcher.FINISHED
        dataset = min(open_datasets, key=lambda d: self.asked[d])  # round-robin: datasets share the cluster
        study = self.studies[dataset]
        for _ in range(MAX_RESAMPLES):  # then run the twin rather than stall the sweep
            trial = study.ask()
            config = suggest_config(trial, self.space)
            twin = find_twin(study, trial)
            if twin is None:
                break
            trial.set_user_attr("twin_of", twin)  # told FAIL: the sampler learns nothing from it
            study.tell(trial, state=TrialState.FAIL)
        self.asked[dataset] += 1
        self.live[trial_id] = (dataset, trial.number)
        self._handles[trial_id] = trial
        return {"dataset": dataset, **config}

    def _trial(self, trial_id: str) -> tuple[optuna.Study, optuna.Trial] | None:
        if trial_id not in self.live:
            return None
        dataset, number = self.live[trial_id]
        study = self.studies[dataset]
        if trial_id not in self._handles:  # after a restore: rebuild the handle of the running trial
            self._handles[trial_id] = optuna.Trial(study, study.trials[number]._trial_id)
        return study, self._handles[trial_id]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        found = self._trial(trial_id)
        if found and self.metric in result:
            _, trial = found
            trial.report(float(result[self.metric]), step=int(result["epoch"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        found = self._trial(trial_id)
        if not found:
            return
        study, trial = found
        self.live.pop(trial_id, None)
        self._handles.pop(trial_id, None)
        if study.trials[trial.number].state != TrialState.RUNNING:
            return
        if error or not result or self.metric not in result:
            study.tell(trial, state=TrialState.FAIL)
            return
        # Tune hands the final result to on_trial_complete only: record it as the last intermediate value
        step = int(result.get("epoch", 0))
        if step not in study.trials[trial.number].intermediate_values:
            trial.report(float(result[self.metric]), step=step)
        if step >= self.max_t:
            study.tell(trial, float(result[self.metric]))
        else:  # stopped early by ASHA: Optuna keeps its last reported (intermediate) value
            study.tell(trial, state=TrialState.PRUNED)

    # Tune saves the searcher with every experiment checkpoint; `resume` restores it.
    def save(self, checkpoint_path: str) -> None:
        studies = None if self.storage else self.studies  # RDB studies live in their database
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"studies": studies, "asked": self.asked, "live": self.live, "budget": self.budget}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:  # our own file, written by save() above
            state = pickle.load(f)
        if state["studies"] is not None:
            self.studies = state["studies"]
        self.asked, self.live, self.budget = state["asked"], state["live"], state["budget"]
        self._handles = {}
