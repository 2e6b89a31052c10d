"""Early stopping per dataset: ASHA's rungs compare a trial only with trials of its own dataset.

One Tune job runs every dataset of a sweep. Tune's single `ASHAScheduler` would rank them all on the
same rungs, so a dataset whose accuracies are lower (Fashion-MNIST beside digits, Stanford Cars
beside Flowers102) has its trials stopped by the other dataset's scores, and may be left with no
trial that ran to `max_t`. Here each dataset has its own ASHA (its own brackets and rungs); a trial is
routed by its `dataset` config key.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler


class PerDatasetASHA(FIFOScheduler):
    def __init__(self, datasets: list[str], time_attr: str = "epoch", **asha: Any):
        super().__init__()
        self.by_dataset = {d: ASHAScheduler(time_attr=time_attr, **asha) for d in datasets}

    def _asha(self, trial) -> ASHAScheduler:
        return self.by_dataset[trial.config["dataset"]]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        return all([s.set_search_properties(metric, mode, **spec) for s in self.by_dataset.values()])

    def on_trial_add(self, tune_controller, trial) -> None:
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._asha(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._asha(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{d}: {s.debug_string()}" for d, s in self.by_dataset.items())
