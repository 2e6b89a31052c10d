"""Classification heads over frozen U-Net feature maps (N, C, H, W) -> class logits.

The paper's heads, with hyper-parameters as keyword arguments so the search space can name them:
linear (BN probe), mlp, cnn, attention (CLS token + transformer), fusion (attention over tokens
of several (t, block) maps at once, the DifFormer idea), and mixing (Diffusion Hyperfeatures: a
learned softmax-weighted sum of many (t, block) maps). Which head reads what is in
`trials/head_registry.py`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trials.head_registry import HEADS, head_spec  # noqa: F401 - HEADS re-exported for callers


class LinearHead(nn.Module):
    """Adaptive avg-pool to p×p -> flatten -> BatchNorm1d -> Linear (the paper's linear probe)."""

    def __init__(self, channels: int, spatial: int, num_classes: int, pool: int = 1):
        super().__init__()
        dim = channels * min(pool, spatial) ** 2
        self.pool = min(pool, spatial)
        self.norm = nn.BatchNorm1d(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(F.adaptive_avg_pool2d(x, self.pool).flatten(1)))


class MLPHead(nn.Module):
    def __init__(self, channels: int, spatial: int, num_classes: int, pool: int = 1, hidden: int = 512,
                 depth: int = 1, dropout: float = 0.0):
        super().__init__()
        self.pool = min(pool, spatial)
        dim = channels * self.pool ** 2
        layers: list[nn.Module] = [nn.BatchNorm1d(dim)]
        for i in range(depth):
            layers += [nn.Linear(dim if i == 0 else hidden, hidden), nn.GELU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden if depth else dim, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(F.adaptive_avg_pool2d(x, self.pool).flatten(1))


class ConcatHead(MLPHead):
    """The mlp over several (t, block) maps at once: each map average-pooled to p×p, the pooled
    features concatenated (in the listed order), then BN -> Linear -> GELU -> ... -> Linear. Maps
    of other blocks hold other features of the same image, which one classifier can weigh jointly
    (an ensemble of per-map heads only averages their answers)."""

    def __init__(self, channels: Sequence[int], spatial: Sequence[int], num_classes: int, **kw: Any):
        super().__init__(sum(channels), min(spatial), num_classes, **kw)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        maps = [x] if torch.is_tensor(x) else list(x)
        return self.net(torch.cat([F.adaptive_avg_pool2d(m, self.pool).flatten(1) for m in maps], dim=1))


class CNNHead(nn.Module):
    """conv3×3 + BN + ReLU layers over the map -> global average pool -> Linear."""

    def __init__(self, channels: int, spatial: int, num_classes: int, width: int = 128, depth: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm2d(channels)]
        for i in range(depth):
            layers += [nn.Conv2d(channels if i == 0 else width, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width if depth else channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.body(x).mean(dim=(2, 3))))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block; attention through PyTorch's scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.drop(self.proj(h))
        return x + self.drop(self.mlp(self.norm2(x)))


class MapTokens(nn.Module):
    """A feature map -> tokens: pool to ≤max_tokens_side², LayerNorm over channels, 1×1 projection to
    width d, plus a learned position embedding."""

    def __init__(self, channels: int, spatial: int, dim: int, max_side: int = 16):
        super().__init__()
        self.side = min(spatial, max_side)
        self.norm = nn.LayerNorm(channels)
        self.proj = nn.Linear(channels, dim)  # = 1×1 conv on the map
        self.pos = nn.Parameter(torch.zeros(1, self.side * self.side, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.side:
            x = F.adaptive_avg_pool2d(x, self.side)
        return self.proj(self.norm(x.flatten(2).transpose(1, 2))) + self.pos


class AttentionHead(nn.Module):
    """LayerNorm -> 1×1 conv to width d -> CLS token + k transformer blocks -> Linear on CLS."""

    def __init__(self, channels: int | Sequence[int], spatial: int | Sequence[int], num_classes: int,
                 dim: int = 128, heads: int = 4, depth: int = 2, dropout: float = 0.0):
        super().__init__()
        chans = [channels] if isinstance(channels, int) else list(channels)
        sides = [spatial] if isinstance(spatial, int) else list(spatial)
        self.tokens = nn.ModuleList(MapTokens(c, s, dim) for c, s in zip(chans, sides))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls, std=0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, dropout=dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        maps = [x] if torch.is_tensor(x) else list(x)
        tokens = torch.cat([embed(m) for embed, m in zip(self.tokens, maps)], dim=1)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.fc(self.norm(self.blocks(tokens))[:, 0])


class FusionHead(AttentionHead):
    """The attention head over tokens from several (t, block) maps at once; each map has its own
    norm, projection and position embedding, so maps of different shapes mix."""

    def __init__(self, channels: Sequence[int], spatial: Sequence[int], num_classes: int, **kw: Any):
        super().__init__(list(channels), list(spatial), num_classes, **kw)


class MixingHead(nn.Module):
    """Diffusion Hyperfeatures' aggregation: every (t, block) map through its block's bottleneck
    (1×1 conv to width `dim` + GroupNorm with one group + GELU, shared across t, as the block's
    channels mean the same thing at every t), resized to `side`×`side`, summed with one learned
    softmax-normalised weight per (t, block), then a classifier on the mixed map: `linear` (global
    average pool -> Linear) or `attention` (the attention head, one transformer block of width `dim`,
    over the side² tokens of the mixed map).

    `maps` is each input's (t, block); without it every input has its own bottleneck."""

    CLASSIFIERS = ("linear", "attention")

    def __init__(self, channels: Sequence[int], spatial: Sequence[int], num_classes: int,
                 maps: Sequence[Sequence[int]] | None = None, dim: int = 64, side: int = 8, dropout: float = 0.0,
                 classifier: str = "linear"):
        super().__init__()
        if classifier not in self.CLASSIFIERS:
            raise ValueError(f"mixing classifier '{classifier}' unknown; use one of {', '.join(self.CLASSIFIERS)}")
        chans = [channels] if isinstance(channels, int) else list(channels)
        labels = maps if maps is not None else [(0, i) for i in range(len(chans))]
        self.maps = [tuple(int(v) for v in m) for m in labels]
        if len(self.maps) != len(chans):
            raise ValueError(f"{len(chans)} input maps but {len(self.maps)} (t, block) labels")
        self.blocks = [b for _, b in self.maps]
        channels_of: dict[int, int] = {}
        for b, c in zip(self.blocks, chans):
            if channels_of.setdefault(b, c) != c:
                raise ValueError(f"block {b} has maps of {channels_of[b]} and {c} channels")
        self.side = int(side)
        # one group: small groups (1 channel at dim ≤ 32) would remove each channel's per-image mean,
        # which is where a pooled feature's class signal often sits
        self.bottleneck = nn.ModuleDict({
            str(b): nn.Sequential(nn.Conv2d(c, dim, 1, bias=False), nn.GroupNorm(1, dim), nn.GELU())
            for b, c in channels_of.items()})
        self.mix = nn.Parameter(torch.zeros(len(self.maps)))  # uniform weights at the start
        self.classifier = classifier
        if classifier == "attention":
            heads = next(h for h in (4, 2, 1) if dim % h == 0)
            self.attend = AttentionHead(dim, self.side, num_classes, dim=dim, heads=heads, depth=1, dropout=dropout)
        else:
            self.drop = nn.Dropout(dropout)
            self.fc = nn.Linear(dim, num_classes)

    def map_weights(self) -> torch.Tensor:
        """The mixing weights, one per input (t, block), summing to one."""
        return torch.softmax(self.mix.float(), dim=0)

    def mixed(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """The (N, dim, side, side) mixed map."""
        maps = [x] if torch.is_tensor(x) else list(x)
        w = self.map_weights()
        out = 0
        for i, (m, b) in enumerate(zip(maps, self.blocks)):
            h = self.bottleneck[str(b)](m)
            if h.shape[-1] > self.side:  # averaging, not sampling, when shrinking
                h = F.adaptive_avg_pool2d(h, self.side)
            elif h.shape[-1] < self.side:
                h = F.interpolate(h, size=(self.side, self.side), mode="bilinear", align_corners=False)
            out = out + w[i].to(h.dtype) * h
        return out

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if self.classifier == "attention":
            return self.attend(self.mixed(x))
        return self.fc(self.drop(self.mixed(x).mean(dim=(2, 3))))


def head_hyperparameters(head: str) -> tuple[str, ...]:
    """The architecture parameters a head's builder takes (what `space.head.<head>` may search, with
    the optimisation settings). `pool` comes from `space.pool`, not from the head's own entry."""
    return head_spec(head).params


def build_head(head: str, channels: int | Sequence[int], spatial: int | Sequence[int], num_classes: int,
               **hparams: Any) -> nn.Module:
    """Build a head by name. Hyper-parameters that the head does not take are an error."""
    spec = head_spec(head)
    if not spec.multi_map and not isinstance(channels, int):
        raise ValueError(f"head '{head}' reads one map; use a head that reads several (concat, fusion, mixing) "
                         "for several")
    return spec.cls()(channels, spatial, num_classes, **hparams)


def build_head_for_maps(head: str, shapes: Sequence[Sequence[int]], num_classes: int, **hparams: Any) -> nn.Module:
    """Build a head for feature maps of the given (C, H, W) shapes: one map, or several for a
    head that reads several (fusion)."""
    channels = [int(s[0]) for s in shapes]
    sides = [int(s[-1]) for s in shapes]
    if head_spec(head).multi_map:
        return build_head(head, channels, sides, num_classes, **hparams)
    return build_head(head, channels[0], sides[0], num_classes, **hparams)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
