"""Trial checkpoints that stay restorable after a driver is killed, without piling up.

Tune's own `CheckpointConfig(num_to_keep=k)` deletes a trial's older checkpoint folders as soon as a newer
one is registered, but the experiment state that `Tuner.restore` reads reaches storage later (it is
snapshotted at intervals and copied by a background sync). A driver killed in between leaves a snapshot
naming a deleted folder, and the resumed trial fails with "Could not recover from checkpoint as it does not
exist on storage anymore" (seen in tests/test_faults.py). So Tune keeps every folder, and this callback drops
only the weights of a trial's superseded checkpoints: each folder keeps its small epoch file, from which the
trainable replays the trial's deterministic epochs (trials/trainable.py: restore_trainer_state).
"""

from __future__ import annotations

import logging
import posixpath

from ray.tune import Callback

from trials.trainable import WEIGHTS_FILE

log = logging.getLogger(__name__)


class CheckpointThinning(Callback):
    """Keep the weights of each trial's `keep` newest checkpoints; older ones keep only their epoch."""

    def __init__(self, keep: int):
        self.keep = keep
        # trial id -> its checkpoints that still hold weights, oldest first; a resumed driver starts empty, so
        # a resumed trial keeps the weights of its last checkpoint before the kill as well (one file more)
        self.full: dict[str, list] = {}

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        full = self.full.setdefault(trial.trial_id, [])
        full.append(checkpoint)
        while len(full) > self.keep:
            old = full.pop(0)
            try:  # the storage's own filesystem: a local folder, s3://, gs://
                old.filesystem.delete_file(posixpath.join(old.path, WEIGHTS_FILE))
            except FileNotFoundError:
                pass
            except OSError as e:  # disk space only; never fatal to the sweep
                log.warning("could not drop the weights of superseded checkpoint %s (%s)", old.path, e)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.full.pop(trial.trial_id, None)  # its checkpoints stay as they are
