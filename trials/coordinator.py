"""Exactly-once feature extraction across a Ray cluster.

A named async actor, one per sweep, owns the in-flight extractions. Whoever asks for a group
(dataset, split, t) first launches its shard tasks; everyone who asks while they run awaits the same
object refs. A shard that crashes is retried by Ray (`max_retries`); if it still fails, the entry is
dropped, so the next request starts afresh, and nothing half-written is ever served (parts are
renamed into place only when complete).
"""

from __future__ import annotations

import ray

from trials.features import (BackboneSpec, DatasetSpec, ExtractJob, ExtractStats, missing_blocks, run_extract_job,
                             shard_jobs)
from trials.store import FeatureStore


@ray.remote(max_retries=3)
def extract_task(job: ExtractJob) -> ExtractStats:
    return run_extract_job(job)


@ray.remote(num_cpus=0)
class FeatureCoordinator:
    def __init__(self, store_root: str, task_options: dict | None = None):
        self.store = FeatureStore(store_root)
        self.store_root = store_root
        self.task_options = task_options or {}
        self.inflight: dict[str, list] = {}
        self.launches: dict[str, int] = {}  # group -> extraction launches (tests check exactly-once)

    async def ensure(self, backbone: BackboneSpec, dataset: DatasetSpec, split: str, t: int,
                     blocks: tuple[int, ...], noise_seed: int, max_spatial: int, verify: bool = False,
                     shard_size: int = 4096, batch_size: int = 256) -> list[str]:
        """Return once every (block) key of the group is in the store; extract it at most once.

        Returns the keys this call's own extraction wrote ([] when they were stored already, or
        when another caller's extraction stored them while this one waited)."""
        group = f"{dataset.name}/{split}/t{t}/{noise_seed}/{backbone.sha256}"
        while True:
            refs = self.inflight.get(group)
            mine = refs is None
            if mine:
                probe = ExtractJob(backbone, dataset, split, t, tuple(blocks), noise_seed, max_spatial)
                missing = missing_blocks(probe, self.store, verify)
                if not missing:
                    return []
                jobs = shard_jobs(backbone, dataset, split, t, tuple(missing), noise_seed, self.store_root,
                                  max_spatial, shard_size, batch_size)
                refs = [extract_task.options(**self.task_options).remote(job) for job in jobs]
                self.inflight[group] = refs
                self.launches[group] = self.launches.get(group, 0) + 1
            try:
                stats = [await ref for ref in refs]
            finally:
                if self.inflight.get(group) is refs:
                    del self.inflight[group]
            if mine:
                return [k for s in stats for k in s.keys]
            # someone else's extraction of this group finished: it may have covered other blocks, so
            # look again (a second pass finds nothing missing when it covered ours)

    def launch_counts(self) -> dict[str, int]:
        return dict(self.launches)


def get_coordinator(name: str, store_root: str, task_options: dict | None = None):
    """The sweep's coordinator, created on first use (get_if_exists makes creation race-free)."""
    return FeatureCoordinator.options(name=f"diffsweep-features-{name}", get_if_exists=True).remote(
        store_root, task_options)
