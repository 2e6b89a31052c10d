"""Single-pass, multi-block feature capture that stops after the deepest block it needs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trials.unet import UNetModel


def capture_blocks(model: UNetModel, x: torch.Tensor, t: torch.Tensor | int, blocks: list[int] | tuple[int, ...],
                   y: torch.Tensor | None = None, pool: int | None = None) -> dict[int, torch.Tensor]:
    """Run `model` on the noisy input `x` at step `t`, returning {block number: output} for `blocks`.

    Blocks use the paper's 1-based numbering. Nothing after the deepest requested block runs (no
    later blocks, no output head). With `pool`, each map is adaptive-average-pooled to at most
    pool×pool in the same call (maps already smaller are kept as they are).
    """
    wanted = sorted(set(int(b) for b in blocks))
    n_in, n_out = len(model.input_blocks), len(model.output_blocks)
    total = n_in + 1 + n_out
    if not wanted or wanted[0] < 1 or wanted[-1] > total:
        raise ValueError(f"blocks {list(blocks)} outside 1..{total} for this U-Net")
    if not torch.is_tensor(t):
        t = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    elif t.dim() == 0:
        t = t.expand(x.shape[0])
    emb = model.embed(t.to(x.device), y)
    last = wanted[-1]
    out: dict[int, torch.Tensor] = {}

    def keep(number: int, h: torch.Tensor) -> None:
        if number in wanted:
            if pool is not None and h.shape[-1] > pool:
                h = F.adaptive_avg_pool2d(h, pool)
            out[number] = h

    skips, h, number = [], x, 0
    for block in model.input_blocks:
        number += 1
        h = block(h, emb)
        skips.append(h)
        keep(number, h)
        if number == last:
            return out
    number += 1
    h = model.middle_block(h, emb)
    keep(number, h)
    for block in model.output_blocks:
        if number == last:
            break
        number += 1
        h = block(torch.cat([h, skips.pop()], dim=1), emb)
        keep(number, h)
    return out
