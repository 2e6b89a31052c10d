"""`diffsweep blocks --arch NAME [--json]`: the paper's block numbering for one U-Net architecture."""

from __future__ import annotations

import json
from dataclasses import asdict

from trials.blocks import block_table


def blocks_command(arch: str, as_json: bool = False) -> str:
    """One row per block: number (1-based, paper order), module path, channels, resolution.

    Text: an aligned table with a header line. JSON: a list of objects with keys number, module,
    channels, resolution (resolution is the square map's side in pixels at the architecture's
    image size). An unknown architecture raises ValueError listing the known ones. The model is
    built on the meta device, so this is instant even for the 552M-parameter ADM.
    """
    rows = block_table(arch)
    if as_json:
        return json.dumps([asdict(r) for r in rows], indent=2)
    header = ("block", "module", "channels", "resolution")
    cells = [(str(r.number), r.module, str(r.channels), f"{r.resolution}x{r.resolution}") for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    lines = []
    for c in [header, *cells]:
        lines.append(f"{c[0]:>{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]:>{widths[2]}}  {c[3]:>{widths[3]}}".rstrip())
    return "\n".join(lines)
