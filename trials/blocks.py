"""Paper block numbering: 1..N over input_blocks, middle_block, output_blocks (1-based)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from trials.unet import Downsample, ResBlock, UNetConfig, UNetModel, Upsample, create_unet, make_config


@dataclass(frozen=True)
class BlockInfo:
    number: int  # paper numbering, 1-based
    module: str  # module path in the state dict, e.g. "output_blocks.4"
    channels: int
    resolution: int  # spatial size (square) at the architecture's image size


def _out_channels(block: nn.Module, channels: int) -> int:
    for layer in block:
        if isinstance(layer, ResBlock):
            channels = layer.out_layers[-1].out_channels
        elif isinstance(layer, nn.Conv2d):
            channels = layer.out_channels
        elif isinstance(layer, Downsample) and isinstance(layer.op, nn.Conv2d):
            channels = layer.op.out_channels
        elif isinstance(layer, Upsample) and layer.use_conv:
            channels = layer.conv.out_channels
    return channels


def _scale(block: nn.Module) -> float:
    s = 1.0
    for layer in block:
        if isinstance(layer, Downsample) or (isinstance(layer, ResBlock) and isinstance(layer.h_upd, Downsample)):
            s /= 2
        elif isinstance(layer, Upsample) or (isinstance(layer, ResBlock) and isinstance(layer.h_upd, Upsample)):
            s *= 2
    return s


def block_table(arch: str | dict | UNetConfig | UNetModel) -> list[BlockInfo]:
    """One row per block. Built on the meta device (no weights), once per architecture."""
    if isinstance(arch, UNetModel):
        return _table(arch)
    return list(_config_table(make_config(arch)))


@functools.lru_cache(maxsize=32)
def _config_table(config: UNetConfig) -> tuple[BlockInfo, ...]:
    import torch
    with torch.device("meta"):  # building the 553M-parameter model's modules still takes ~0.15 s
        return tuple(_table(create_unet(config)))


def _table(model: UNetModel) -> list[BlockInfo]:
    res = float(model.config.image_size)
    channels = model.config.in_channels
    names = ([f"input_blocks.{i}" for i in range(len(model.input_blocks))] + ["middle_block"]
             + [f"output_blocks.{i}" for i in range(len(model.output_blocks))])
    rows = []
    for number, (name, block) in enumerate(zip(names, model.blocks()), start=1):
        channels = _out_channels(block, channels)
        res *= _scale(block)
        rows.append(BlockInfo(number, name, channels, int(res)))
    return rows


def num_blocks(arch) -> int:
    return len(block_table(arch))
