"""Several trained heads as one: each member reads its own (t, block) maps, the ensemble answers
with the mean of the members' class probabilities. `selection.ensemble: k` exports the k best
trials of a dataset this way when their mean beats the best single trial on validation.

`forward` returns log(mean probability), so `argmax` and `softmax` read it as they read a single
head's logits (softmax of it is the mean probability itself).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class EnsembleHead(nn.Module):
    def __init__(self, members: Sequence[nn.Module], member_maps: Sequence[Sequence[Sequence[int]]],
                 maps: Sequence[Sequence[int]]):
        """`forward` gets the (t, block) maps `maps`, in that order; `members[i]` reads the ones
        listed in `member_maps[i]`, in its own order."""
        super().__init__()
        if len(members) != len(member_maps) or not members:
            raise ValueError("an ensemble needs one map list per member, and at least one member")
        order = [tuple(map(int, m)) for m in maps]
        self.members = nn.ModuleList(members)
        self.inputs = [[order.index(tuple(map(int, m))) for m in mine] for mine in member_maps]

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        maps = [x] if torch.is_tensor(x) else list(x)
        logits = [member(maps[idx[0]] if len(idx) == 1 else [maps[i] for i in idx])
                  for member, idx in zip(self.members, self.inputs)]
        return mean_softmax(logits).clamp_min(1e-12).log()


def mean_softmax(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ensemble's answer from its members' logits (N × classes each): their mean probability.
    The sweep scores an ensemble on validation and test with this, and exports run it in forward."""
    return torch.stack([torch.softmax(z.float(), dim=-1) for z in logits]).mean(0)
