"""Every head, declared once: what it reads, its default learning rate per recipe, its builder.

Torch-free (the builder is named, imported on first use) so a bad sweep YAML is refused before
torch, Ray or MLflow load. Adding a head = its class in `trials/heads.py` + one entry here.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Mapping

# Arguments every builder takes from the data (or from `space.pool`), never from `space.head.<head>`.
_DATA_ARGS = ("self", "channels", "spatial", "num_classes", "pool", "maps")


@dataclass(frozen=True)
class HeadSpec:
    name: str
    # "pooled": the map's adaptive-average-pooled p×p cache (p from space.pool); "map": one full
    # (t, block) map; "maps": several (t, block) maps at once, from a list of map sets in the space;
    # "pooled_maps": the pooled caches of several maps at once (one p for all of them)
    reads: Literal["pooled", "map", "maps", "pooled_maps"]
    lr: Mapping[str, float]  # recipe name -> default learning rate
    builder: str  # "module:Class"
    maps_field: str | None = None  # "maps" / "pooled_maps" heads: the Space field listing their map sets
    # "maps" heads: with no map set listed, read every (t, block) the space captures (else it is an error)
    all_maps_by_default: bool = False
    takes_maps: bool = False  # the builder is told each input's (t, block) (keyword `maps`)

    @property
    def pooled(self) -> bool:
        return self.reads in ("pooled", "pooled_maps")

    @property
    def multi_map(self) -> bool:
        return self.reads in ("maps", "pooled_maps")

    def cls(self) -> type:
        module, name = self.builder.split(":")
        return getattr(importlib.import_module(module), name)

    @property
    def params(self) -> tuple[str, ...]:
        """The architecture parameters `space.head.<name>` may search (besides the optimiser's):
        the builder's own keyword arguments, so the constructor stays the one place they are named."""
        init = self.cls().__init__
        own = inspect.signature(init).parameters
        if any(p.kind is p.VAR_KEYWORD for p in own.values()):  # a thin subclass: its base's arguments
            own = inspect.signature(self.cls().__mro__[1].__init__).parameters
        return tuple(p for p in own if p not in _DATA_ARGS)


def _lr(paper: float, adamw: float) -> Mapping[str, float]:
    return MappingProxyType({"paper": paper, "adamw": adamw})


# The paper's learning rates (SGD recipe): 1e-2 for the linear probe, 5e-2 for the attention head.
REGISTRY: Mapping[str, HeadSpec] = MappingProxyType({s.name: s for s in (
    HeadSpec("linear", "pooled", _lr(1e-2, 1e-3), "trials.heads:LinearHead"),
    HeadSpec("mlp", "pooled", _lr(1e-2, 1e-3), "trials.heads:MLPHead"),
    HeadSpec("cnn", "map", _lr(1e-2, 1e-3), "trials.heads:CNNHead"),
    HeadSpec("attention", "map", _lr(5e-2, 3e-4), "trials.heads:AttentionHead"),
    HeadSpec("concat", "pooled_maps", _lr(1e-2, 1e-3), "trials.heads:ConcatHead", maps_field="concat_maps"),
    HeadSpec("fusion", "maps", _lr(5e-2, 3e-4), "trials.heads:FusionHead", maps_field="fusion_maps"),
    HeadSpec("mixing", "maps", _lr(1e-2, 1e-3), "trials.heads:MixingHead", maps_field="mixing_maps",
             all_maps_by_default=True, takes_maps=True),
)})
HEADS = tuple(REGISTRY)


def head_spec(name: str) -> HeadSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown head '{name}'; known: {', '.join(HEADS)}")
    return REGISTRY[name]
