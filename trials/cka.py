"""Linear CKA between feature sets, streamed in minibatches (no n×n kernel in memory).

The estimator is the one of Nguyen, Raghu & Kornblith (2021, "Do wide and deep networks learn the
same things?"): for each minibatch of m images, K = XXᵀ and L = YYᵀ, the unbiased HSIC of Song et al.

    HSIC_u(K, L) = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((m-1)(m-2)) − 2/(m-2)·1ᵀK̃L̃1] / (m(m-3)),   K̃ = K, diagonal zeroed

is averaged over minibatches, and CKA = mean HSIC(K,L) / sqrt(mean HSIC(K,K) · mean HSIC(L,L)).
Every feature set sees the same seeded permutation of images, so a matrix is reproducible.
Features are flattened per image: an (N, C, H, W) map is N×(C·H·W).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def full_batch_linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """The standard (biased) linear CKA on centered features: ||YᵀX||²_F / (||XᵀX||_F ||YᵀY||_F)."""
    x = torch.as_tensor(x).flatten(1).double()
    y = torch.as_tensor(y).flatten(1).double()
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm()))


class Rows:
    """Make an in-memory (N, ...) array or tensor look like a FeatureArray (len, take)."""

    def __init__(self, data: Any):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def take(self, indices: np.ndarray) -> Any:
        return self.data[torch.as_tensor(indices)] if torch.is_tensor(self.data) else self.data[indices]


def _hsic_matrix(grams: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC between every pair of (F, m, m) Gram matrices -> (F, F), in float64."""
    g = grams.double()
    m = g.shape[-1]
    g = g * (1 - torch.eye(m, dtype=g.dtype, device=g.device))  # K̃: diagonal zeroed
    flat = g.flatten(1)
    rows = g.sum(-1)  # K̃1
    total = rows.sum(-1)  # 1ᵀK̃1
    trace = flat @ flat.T  # tr(K̃L̃) (both symmetric)
    return (trace + torch.outer(total, total) / ((m - 1) * (m - 2)) - 2 / (m - 2) * (rows @ rows.T)) / (m * (m - 3))


@torch.no_grad()
def cka_matrix(feature_sets_a: Sequence, feature_sets_b: Sequence | None = None, batch_size: int = 256,
               seed: int = 0, device: str | None = None) -> np.ndarray:
    """CKA between every set in `feature_sets_a` and every set in `feature_sets_b` (default: a itself).

    Sets are FeatureArray-like (`len()`, `take(indices)` -> rows) over the same images in the same
    order. One pass streams the same shuffled minibatches through all of them. The estimator wants
    equal batches, so N images make k = ceil(N / batch_size) batches of m = N // k (at most k - 1
    images are left out); m must be at least 4.
    """
    sets_b = list(feature_sets_a if feature_sets_b is None else feature_sets_b)
    unique: list = []  # a set passed on both sides is read once
    for s in [*feature_sets_a, *sets_b]:
        if not any(s is u for u in unique):
            unique.append(s)
    n = len(unique[0])
    if any(len(s) != n for s in unique):
        raise ValueError(f"feature sets differ in length: {sorted({len(s) for s in unique})}")
    m = n // -(-n // max(batch_size, 1)) if n else 0
    if m < 4:
        raise ValueError(f"CKA needs minibatches of at least 4 images (have {n} images, batch_size {batch_size})")
    device = device or default_device()
    perm = np.random.default_rng(seed).permutation(n)
    shift: list[torch.Tensor | None] = [None] * len(unique)
    hsic = torch.zeros(len(unique), len(unique), dtype=torch.float64, device=device)
    for start in range(0, n - m + 1, m):
        idx = np.sort(perm[start:start + m])  # order inside a batch does not change HSIC; sorted reads are faster
        grams = []
        for i, s in enumerate(unique):
            rows = s.take(idx)
            x = (rows if torch.is_tensor(rows) else torch.from_numpy(np.asarray(rows))).to(device).flatten(1).float()
            if shift[i] is None:  # HSIC_u is exactly shift-invariant; a fixed shift keeps float32 Grams accurate
                shift[i] = x.mean(0)
            x = x - shift[i]
            grams.append(x @ x.T)
        hsic += _hsic_matrix(torch.stack(grams))
    pos = [[next(j for j, u in enumerate(unique) if u is s) for s in side] for side in (feature_sets_a, sets_b)]
    self_hsic = hsic.diagonal()
    out = hsic[pos[0]][:, pos[1]] / torch.sqrt(torch.outer(self_hsic[pos[0]], self_hsic[pos[1]]))
    return out.cpu().numpy()


def minibatch_linear_cka(x: Any, y: Any, batch_size: int = 256, seed: int = 0, device: str | None = None) -> float:
    """Minibatch CKA of two in-memory (N, ...) arrays or tensors."""
    return float(cka_matrix([Rows(x)], [Rows(y)], batch_size, seed, device)[0, 0])
