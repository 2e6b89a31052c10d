"""Pooled feature caches: a (t, block) map adaptive-average-pooled to p×p, made once and shared.

Linear and MLP heads read only a p×p pooling of a stored map. Pooling the full map on every batch
of every epoch of every trial reads the whole map each time (≈74 GB for one 28-epoch linear probe on
CUB at block 24); the pooled cache is made in one streaming pass over the map, written to the store
under the map's key plus `pool`, and memory-mapped by every trial that wants it. It is float32,
computed by the same `adaptive_avg_pool2d` the heads apply, so a head sees exactly the numbers it
would have computed itself (the head's own pooling of a p×p input to p×p is the identity).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from trials.store import FeatureKey, FeatureStore

ROWS_PER_PASS = 512  # rows of the map pooled at a time: bounds the builder's memory


def pooled_side(pool: int, side: int) -> int:
    """The side a p×p pooling of a side×side map has (a head never upsamples)."""
    return min(int(pool), int(side))


def build_pooled(store: FeatureStore, key: FeatureKey, pools: list[int]) -> list[FeatureKey]:
    """Write the pooled caches of `key` for every pool in `pools` in one pass over the map."""
    source = store.read(key, verify=True)
    channels, side = source.shape[1], source.shape[-1]
    sides = sorted({pooled_side(p, side) for p in pools})
    keys = [key.pooled(s) for s in sides]
    writers = [store.part_writer(k, 0, 1, (channels, s, s), {"pooled_from": key.stem}, dtype=np.float32)
               for k, s in zip(keys, sides)]
    try:
        for start, chunk in source.iter_rows(ROWS_PER_PASS):
            x = torch.from_numpy(np.array(chunk, dtype=np.float32))  # a bounded copy out of the map
            stop = start + len(chunk)
            for w, s in zip(writers, sides):
                w.write(F.adaptive_avg_pool2d(x, s).numpy(), source.labels[start:stop], source.image_ids[start:stop])
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return keys
