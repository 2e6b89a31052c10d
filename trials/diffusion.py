"""Noise schedules, q_sample, and seeded noise that makes every feature a pure function of its key."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from trials.constants import NUM_TIMESTEPS  # noqa: E402 - torch-free, for the config


def betas(schedule: str = "linear", steps: int = NUM_TIMESTEPS) -> np.ndarray:
    """guided-diffusion's β schedules (float64)."""
    if schedule == "linear":
        scale = 1000 / steps  # keeps the schedule's shape for step counts other than 1000
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    if schedule == "cosine":
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)])
    raise ValueError(f"unknown noise schedule '{schedule}'; use 'linear' or 'cosine'")


def alphas_cumprod(schedule: str = "linear", steps: int = NUM_TIMESTEPS) -> np.ndarray:
    return np.cumprod(1.0 - betas(schedule, steps))


def q_sample(x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε, with t an int or one step per image."""
    abar = torch.as_tensor(alphas_cumprod(schedule), dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.long).cpu().expand(x0.shape[0])
    a = abar[t].to(device=x0.device, dtype=torch.float32).view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def noise_seed(seed: int, image_id: str | int, t: int, draw: int = 0) -> int:
    """The seed of one ε: draw 0 is the one every stored feature has always used; draws 1.. are the
    extra members of a noise ensemble (`space.noise_draws`)."""
    text = f"{seed}|{image_id}|{t}" + (f"|{draw}" if draw else "")
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_noise(shape: tuple[int, ...], seed: int, image_ids: list, t: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """ε for each image from its own CPU generator seeded by (seed, image id, t).

    Drawn on the CPU and moved, so the same key gives the same ε on any device and in any batch.
    """
    return seeded_noise_batch(shape, seed, image_ids, (t,))[0].to(device)


def seeded_noise_batch(shape: tuple[int, ...], seed: int, image_ids: list, ts, out: torch.Tensor | None = None,
                       pin_memory: bool = False, workers: int = 1, draws: int = 1) -> torch.Tensor:
    """ε of a whole batch at every step of `ts` in one call: a (len(ts), draws·N, *shape) float32
    tensor, draw-major: row [k, j·N + i] is draw j of image i at ts[k] (so one forward covers them all).

    Row [k, i] (draw 0) is the same ε `seeded_noise` gives image i at ts[k] (one CPU generator per
    (seed, image id, t), drawn straight into its slice of one buffer, pinned on request so it reaches
    a GPU in one non-blocking copy). The values are those the store has always used, so no stored
    key changes. `out` reuses a buffer of that shape; `workers` threads draw disjoint rows (torch
    releases the GIL while it draws), which matters for large images.
    """
    ts = tuple(int(t) for t in ts)
    n = len(image_ids)
    full = (len(ts), draws * n, *shape)
    if out is None or tuple(out.shape) != full:
        out = torch.empty(full, pin_memory=pin_memory)
    rows = [(k, j, i) for k in range(len(ts)) for j in range(draws) for i in range(n)]

    def draw(chunk: list[tuple[int, int, int]]) -> None:
        gen = torch.Generator()
        for k, j, i in chunk:
            gen.manual_seed(noise_seed(seed, image_ids[i], ts[k], j))
            torch.randn(shape, generator=gen, out=out[k, j * n + i])

    if workers <= 1 or len(rows) < 2 * workers:
        draw(rows)
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(draw, [rows[w::workers] for w in range(workers)]))
    return out
