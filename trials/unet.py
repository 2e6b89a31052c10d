"""The guided-diffusion "ADM" U-Net, in one file.

Parameter names and shapes follow guided-diffusion's `UNetModel` exactly for the same flags, so the
official checkpoints (`256x256_diffusion_uncond.pt`, `128x128_diffusion.pt`, `64x64_diffusion.pt`)
load with `strict=True`. Constructor arguments carry guided-diffusion's flag names (`UNetConfig`, in
`trials/unet_config.py`).

Differences from the reference code that do not change results: attention runs through
`scaled_dot_product_attention` (same math, fused kernels), and there is no gradient checkpointing.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# the architecture flags are plain Python in their own module (processes that only name or key a
# model need no torch); callers may import them from here too
from trials.unet_config import ARCHITECTURES, BlockInfo, UNetConfig, make_config  # noqa: F401


# ----------------------------------------------------------------------------------------------
# Layers


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in fp32 whatever the input dtype (as guided-diffusion does)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps: [cos | sin] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.op = (nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1) if use_conv
                   else nn.AvgPool2d(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block; the timestep embedding enters as scale/shift (or a bias) after the 2nd norm."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over spatial positions. Two qkv layouts exist in the released checkpoints:
    legacy (heads split before q/k/v) and the new order (q/k/v split before heads)."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.new_order = use_new_attention_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # (b, 3c, L)
        n, length, ch = self.num_heads, qkv.shape[-1], c // self.num_heads
        if self.new_order:
            q, k, v = (z.reshape(b, n, ch, length) for z in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b, n, 3 * ch, length).split(ch, dim=2)
        # SDPA wants (batch, heads, tokens, channels); the result is the same softmax(qk/sqrt(ch))v.
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = h.transpose(-1, -2).reshape(b, c, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose ResBlocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


# ----------------------------------------------------------------------------------------------
# The network


def _down(side: int, conv: bool) -> int:
    return (side - 1) // 2 + 1 if conv else side // 2  # stride-2 conv (padding 1) / 2x2 average pool


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch0 = cfg.num_channels
        emb_dim = ch0 * 4
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample
        self.time_embed = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.class_cond:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        def res(cin: int, cout: int, **kw) -> ResBlock:
            return ResBlock(cin, emb_dim, cfg.dropout, cout, cfg.use_scale_shift_norm, **kw)

        def attn(c: int, heads: int) -> AttentionBlock:
            return AttentionBlock(c, heads, cfg.num_head_channels, cfg.use_new_attention_order)

        ch = input_ch = int(cfg.mult[0] * ch0)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        side = cfg.image_size
        # the block table, recorded as the blocks are built: (module, channels, resolution) per block
        info = [("input_blocks.0", ch, side)]
        skip_chans, ds = [ch], 1
        for level, m in enumerate(cfg.mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(m * ch0))]
                ch = int(m * ch0)
                if ds in cfg.attention_ds:
                    layers.append(attn(ch, cfg.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                info.append((f"input_blocks.{len(self.input_blocks) - 1}", ch, side))
                skip_chans.append(ch)
            if level != len(cfg.mult) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, True, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                side = _down(side, conv=not cfg.resblock_updown)
                info.append((f"input_blocks.{len(self.input_blocks) - 1}", ch, side))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, cfg.num_heads), res(ch, ch))
        info.append(("middle_block", ch, side))
        self.output_blocks = nn.ModuleList()
        for level, m in list(enumerate(cfg.mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(ch0 * m))]
                ch = int(ch0 * m)
                if ds in cfg.attention_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, True, ch))
                    ds //= 2
                    side *= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                info.append((f"output_blocks.{len(self.output_blocks) - 1}", ch, side))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(input_ch, cfg.out_channels, 3, padding=1))
        self.feature_info: list[BlockInfo] = [BlockInfo(n, m, c, r) for n, (m, c, r) in enumerate(info, start=1)]

    def embed(self, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.config.num_channels))
        if self.config.class_cond:
            if y is None:
                raise ValueError("this U-Net is class-conditional: pass y (class labels, or \"mean\")")
            # "mean": the mean label embedding, a class-neutral reading of a conditional model
            emb = emb + (self.label_emb.weight.mean(0) if isinstance(y, str) else self.label_emb(y))
        return emb

    def blocks(self) -> list[nn.Module]:
        """All blocks in paper order: input_blocks, middle_block, output_blocks."""
        return [*self.input_blocks, self.middle_block, *self.output_blocks]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_intermediates(x, t, (), y=y, stop_early=False, intermediates_only=False)[0]

    def forward_intermediates(self, x: torch.Tensor, t: torch.Tensor | int, indices=None, y=None,
                              stop_early: bool = True, intermediates_only: bool = True):
        """The forward pass, keeping the outputs of the blocks in `indices` (timm's convention).

        `indices`: paper block numbers (1-based, see `feature_info`), one number, or None for all.
        Returns {block number: output}; with `stop_early` nothing after the deepest requested block
        runs (no later blocks, no output head). With `intermediates_only=False` the whole network
        runs and the result is (model output, {block number: output}).
        """
        total = len(self.feature_info)
        wanted = (set(range(1, total + 1)) if indices is None
                  else {int(indices)} if isinstance(indices, int) else {int(b) for b in indices})
        if any(b < 1 or b > total for b in wanted) or (intermediates_only and not wanted):
            raise ValueError(f"blocks {sorted(wanted)} outside 1..{total} for this U-Net")
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        elif t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.embed(t.to(x.device), y)
        last = max(wanted) if (stop_early and intermediates_only) else total
        out: dict[int, torch.Tensor] = {}
        skips, h, number = [], x, 0
        for block in self.input_blocks:
            number += 1
            h = block(h, emb)
            skips.append(h)
            if number in wanted:
                out[number] = h
            if number == last:
                return out
        number += 1
        h = self.middle_block(h, emb)
        if number in wanted:
            out[number] = h
        for block in self.output_blocks:
            if number == last:
                return out
            number += 1
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if number in wanted:
                out[number] = h
        if intermediates_only:
            return out
        return self.out(h), out


def create_unet(config: str | dict[str, Any] | UNetConfig) -> UNetModel:
    """Build the ADM U-Net from an architecture name or guided-diffusion flags."""
    return UNetModel(make_config(config))


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the requested architecture."""


def _load_failure(e: Exception) -> str:
    """One short line saying why torch.load / safetensors refused a file."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours part of its weights_only message
    needs = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if needs:
        return f"the pickle needs code: {needs.group(1)}"
    detail = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    line = detail.group(1) if detail else next((ln for ln in text.splitlines() if ln.strip()), "")
    line = " ".join(line.split())
    return f"{type(e).__name__}: {line[:160]}" if line else type(e).__name__


def load_checkpoint(path: str | Path, arch: str | dict[str, Any] | UNetConfig,
                    map_location: str | torch.device = "cpu") -> UNetModel:
    """Load weights into a fresh U-Net, refusing anything but an exact, data-only match.

    `.safetensors` files are read with safetensors; anything else with `torch.load(weights_only=True)`,
    so a pickle that needs code is refused rather than executed. Every refusal is a one-line
    `CheckpointError` naming the architecture and, where there is one, the first offending key
    (in the architecture's state-dict order; unexpected keys are checked after that).
    """
    path = Path(path)
    name = arch if isinstance(arch, str) else "the given flags"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found; pass the path of a .pt or .safetensors file "
                              f"for architecture {name}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device=str(map_location))
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - turn any loader failure into one line
        raise CheckpointError(f"checkpoint {path}: not a plain weights file for architecture {name} "
                              f"({_load_failure(e)}); only tensor state dicts are loaded "
                              "(weights_only=True)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(state).__name__}, not a state dict for "
                              f"architecture {name}")
    model = create_unet(arch)
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise CheckpointError(f"checkpoint {path}: missing key '{key}' expected by architecture {name}")
        got = state[key]
        if not isinstance(got, torch.Tensor) or got.shape != tensor.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise CheckpointError(f"checkpoint {path}: key '{key}' has shape {shape}, architecture {name} "
                                  f"expects {tuple(tensor.shape)}")
    for key in state:
        if key not in expected:
            raise CheckpointError(f"checkpoint {path}: unexpected key '{key}' for architecture {name}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()
