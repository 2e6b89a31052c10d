"""`diffsweep blocks --arch NAME [--max-spatial S] [--json]`: the paper's block numbering for one U-Net
architecture, with the resolution a head sees once the store caps maps at S×S."""

from __future__ import annotations

import json
from dataclasses import asdict

from trials.blocks import block_table


def blocks_command(arch: str, as_json: bool = False, max_spatial: int = 16) -> str:
    """One row per block: number (1-based, paper order), module path, channels, resolution, and
    `head_sees` (the stored side: the resolution capped at `store.max_spatial`, default 16).

    Text: an aligned table with a header line. JSON: a list of objects with keys number, module,
    channels, resolution, head_sees (sides of the square maps in pixels at the architecture's image
    size). An unknown architecture raises ValueError listing the known ones. The model is built on
    the meta device, so this is instant even for the 552M-parameter ADM.
    """
    rows = [{**asdict(r), "head_sees": min(r.resolution, max_spatial)} for r in block_table(arch)]
    if as_json:
        return json.dumps(rows, indent=2)
    header = ("block", "module", "channels", "resolution", f"head sees (max_spatial {max_spatial})")
    cells = [(str(r["number"]), r["module"], str(r["channels"]), f"{r['resolution']}x{r['resolution']}",
              f"{r['head_sees']}x{r['head_sees']}" + (" (pooled)" if r["head_sees"] < r["resolution"] else ""))
             for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    lines = []
    for c in [header, *cells]:
        lines.append(f"{c[0]:>{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]:>{widths[2]}}  {c[3]:>{widths[3]}}  "
                     f"{c[4]:<{widths[4]}}".rstrip())
    return "\n".join(lines)
