"""Paper block numbering: 1..N over input_blocks, middle_block, output_blocks (1-based).

The table is recorded by `UNetModel` as it builds its blocks (`model.feature_info`); this module
only looks it up, by architecture name, flags or model.
"""

from __future__ import annotations

import functools

from trials.unet import BlockInfo, UNetConfig, UNetModel, create_unet, make_config

__all__ = ["BlockInfo", "block_table", "num_blocks"]


def block_table(arch: str | dict | UNetConfig | UNetModel) -> list[BlockInfo]:
    """One row per block. Built on the meta device (no weights), once per architecture."""
    if isinstance(arch, UNetModel):
        return list(arch.feature_info)
    return list(_config_table(make_config(arch)))


@functools.lru_cache(maxsize=32)
def _config_table(config: UNetConfig) -> tuple[BlockInfo, ...]:
    import torch
    with torch.device("meta"):  # building the 553M-parameter model's modules still takes ~0.15 s
        return tuple(create_unet(config).feature_info)


def num_blocks(arch) -> int:
    return len(block_table(arch))
