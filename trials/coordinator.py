"""Exactly-once feature extraction across a Ray cluster, without deadlocks.

A named async actor, one per sweep, knows what is being computed. Two kinds of callers:

- the driver's store fill (`fill`): the coordinator launches the request's part tasks, each
  declaring the memory it needs (`memory=`), so Ray places only what fits on a node;
- a trial that finds a map (or a pooled cache) missing or corrupt (`ensure_in_trial`): it takes a
  *lease* on the group and computes it in its own process, on the device it already holds. A trial
  never waits for an extraction task that needs a GPU while holding one itself (Ray keeps a waiting
  task's GPU), which is how a cluster whose GPUs are all held by waiting trials would deadlock.

Everyone else who asks for a group while it is computed waits for it, then looks in the store again.
A lease is renewed by its holder every few seconds; one not renewed for `LEASE_TTL_S` (its holder
died) is taken over by the next waiter. The coordinator does no file I/O on its event loop except
listing (checks run in a thread), so checksum reads never serialise its callers. Nor does it import
torch (2.3 CPU-seconds in every sweep's actor): it handles requests (`trials/requests.py`), whose
backbone carries the block table that planning needs.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field

import ray

from trials.requests import ExtractStats, FeatureRequest, FillOptions, PartJob, extraction_memory_bytes, plan_parts
from trials.store import CorruptFeatureFile, FeatureArray, FeatureStore

LEASE_TTL_S = 30.0
RENEW_S = 5.0


@ray.remote(max_retries=3)
def extract_task(job: PartJob) -> ExtractStats:
    from trials.features import fill_part  # torch: in the extraction worker, never in the coordinator

    return fill_part(job)


@dataclass
class Lease:
    holder: str
    renewed: float
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def stale(self) -> bool:
        return time.monotonic() - self.renewed > LEASE_TTL_S


@ray.remote(num_cpus=0)
class FeatureCoordinator:
    def __init__(self, task_options: dict | None = None):
        self.task_options = task_options or {}
        self.inflight: dict[str, list] = {}  # group -> the part tasks of a driver-side fill
        self.leases: dict[str, Lease] = {}  # group -> the trial computing it in its own process
        self.launches: dict[str, int] = {}  # group -> extractions started (tests check exactly-once)

    async def fill(self, request: FeatureRequest, options: FillOptions) -> list[str]:
        """Return once every key of `request` is stored; launch its missing parts at most once.

        Returns the keys this call's own tasks wrote ([] when they were stored already, or when
        another caller's extraction stored them while this one waited)."""
        group = request.group
        while True:
            await self._wait_lease(group)
            refs = self.inflight.get(group)
            mine = refs is None
            if mine:
                missing = await asyncio.to_thread(request.missing, FeatureStore(options.store_root))
                if not missing:
                    return []
                if group in self.inflight or group in self.leases:  # someone started while we looked
                    continue
                jobs = [job for sub in missing for job in plan_parts(sub, options)]
                refs = [extract_task.options(**self.task_options,
                                             memory=extraction_memory_bytes(job.request, options.batch_size)).remote(job)
                        for job in jobs]
                self.inflight[group] = refs
                self.launches[group] = self.launches.get(group, 0) + 1
            try:
                stats = [await ref for ref in refs]
            finally:
                if self.inflight.get(group) is refs:
                    del self.inflight[group]
            if mine:
                return [k for s in stats for k in s.keys]

    async def _wait_lease(self, group: str) -> None:
        while (lease := self.leases.get(group)) is not None and not lease.stale():
            try:
                await asyncio.wait_for(lease.done.wait(), timeout=RENEW_S)
            except asyncio.TimeoutError:
                pass

    async def acquire(self, group: str, holder: str) -> bool:
        """True: the caller now holds the lease on `group` and computes it. False: someone else's
        computation of it ended; the caller looks in the store again."""
        refs = self.inflight.get(group)
        if refs is not None:
            await asyncio.gather(*refs, return_exceptions=True)
            return False
        lease = self.leases.get(group)
        if lease is not None and not lease.stale():
            await self._wait_lease(group)
            return False
        self.leases[group] = Lease(holder, time.monotonic())
        self.launches[group] = self.launches.get(group, 0) + 1
        return True

    def renew(self, group: str, holder: str) -> None:
        lease = self.leases.get(group)
        if lease is not None and lease.holder == holder:
            lease.renewed = time.monotonic()

    def release(self, group: str, holder: str) -> None:
        lease = self.leases.get(group)
        if lease is not None and lease.holder == holder:
            del self.leases[group]
            lease.done.set()

    def launch_counts(self) -> dict[str, int]:
        return dict(self.launches)


def get_coordinator(name: str, task_options: dict | None = None):
    """The sweep's coordinator, created on first use (get_if_exists makes creation race-free)."""
    return FeatureCoordinator.options(name=f"diffsweep-features-{name}", get_if_exists=True).remote(task_options)


class _Leased:
    """Hold the lease on `group` while the body runs, renewing it from a thread."""

    def __init__(self, coordinator, group: str):
        self.coordinator, self.group, self.holder = coordinator, group, uuid.uuid4().hex
        self._stop = threading.Event()

    def acquire(self) -> bool:
        return ray.get(self.coordinator.acquire.remote(self.group, self.holder))

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            self.coordinator.renew.remote(self.group, self.holder)

    def __enter__(self) -> "_Leased":
        threading.Thread(target=self._renew, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        ray.get(self.coordinator.release.remote(self.group, self.holder))


def ensure_in_trial(coordinator, request: FeatureRequest, options: FillOptions, device: str) -> None:
    """Make every key of `request` present, computed once cluster-wide. In this process when this
    worker computes the request's numeric path (its device is already held); otherwise the
    coordinator's tasks do it (this trial then holds no device of the kind they need). Without a
    coordinator (no Ray: benchmarks, one process) it is simply computed here."""
    from trials.features import computes, fill_request  # a trial's process: torch is there already

    store = FeatureStore(options.store_root)
    if coordinator is None:
        fill_request(request, options, verify=True, device=device)
        return
    while request.missing(store, verify=True):
        if not computes(request.numeric, device):
            ray.get(coordinator.fill.remote(request, options))
            continue
        lease = _Leased(coordinator, request.group)
        if not lease.acquire():
            continue
        with lease:
            fill_request(request, options, verify=True, device=device)


def read_pooled(coordinator, store: FeatureStore, request: FeatureRequest, t: int, block: int, pool: int,
                pools: tuple[int, ...]) -> FeatureArray:
    """The p×p pooled cache of one map, built once cluster-wide (with every pool in `pools` in the
    same pass over the map)."""
    from trials.pooled import build_pooled, pooled_side

    key = request.key(t, block)
    side = request.shapes()[block].side
    pooled = key.pooled(pooled_side(pool, side))
    while True:
        try:
            return store.read(pooled, verify=True)
        except KeyError:
            pass
        except CorruptFeatureFile:
            store.delete(pooled)
        if coordinator is None:  # one process, no cluster to share with
            build_pooled(store, key, sorted(set(pools) | {pool}))
            continue
        lease = _Leased(coordinator, pooled.stem)
        if not lease.acquire():
            continue
        with lease:
            if not store.has(pooled):
                build_pooled(store, key, sorted(set(pools) | {pool}))
