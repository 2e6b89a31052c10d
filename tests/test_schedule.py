"""ASHA per dataset: a trial's rungs hold only its own dataset's trials (real Tune schedulers)."""

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from orchestrator.schedule import PerDatasetASHA

ASHA = {"max_t": 3, "grace_period": 1, "reduction_factor": 2, "brackets": 1}


def first_rung(scheduler, scores: list[tuple[str, float]]) -> list[str]:
    """Report epoch 1 of one trial per (dataset, val_acc), in order; the scheduler's decisions."""
    scheduler.set_search_properties("val_acc", "max")
    trials = [Trial("f", config={"dataset": d}, trial_id=f"{d}{i}", stub=True) for i, (d, _) in enumerate(scores)]
    for t in trials:
        scheduler.on_trial_add(None, t)
    return [scheduler.on_trial_result(None, t, {"epoch": 1, "val_acc": acc}) for t, (_, acc) in zip(trials, scores)]


def test_a_harder_dataset_is_not_stopped_by_an_easier_ones_scores():
    scores = [("digits", 0.90), ("digits", 0.92), ("cars", 0.20), ("cars", 0.10)]
    one_asha = first_rung(ASHAScheduler(time_attr="epoch", **ASHA), scores)
    per_dataset = first_rung(PerDatasetASHA(["digits", "cars"], **ASHA), scores)
    # Tune's single ASHA ranks cars' 0.20 against digits' 0.9s and stops it: cars would keep no trial
    assert one_asha == [TrialScheduler.CONTINUE] * 2 + [TrialScheduler.STOP] * 2
    # per dataset: cars' best so far continues, its worse trial is stopped by cars' own rung
    assert per_dataset == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE,
                           TrialScheduler.CONTINUE, TrialScheduler.STOP]
