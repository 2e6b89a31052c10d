"""The guided-diffusion U-Net's architecture flags: `UNetConfig`, the named architectures, and
`make_config`. Plain Python (no torch), so that processes which only name or key a model (the feature
coordinator, config validation) stay light; `trials/unet.py` builds the model from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class UNetConfig:
    """guided-diffusion's flags, one field each (see its `script_util.create_model`)."""

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: tuple[float, ...] = ()  # () = guided-diffusion's default for image_size
    attention_resolutions: tuple[int, ...] = (16, 8)  # resolutions in pixels, as in the flag
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    learn_sigma: bool = False
    class_cond: bool = False
    num_classes: int = 1000
    dropout: float = 0.0
    in_channels: int = 3
    use_fp16: bool = False  # accepted for compatibility; dtype is chosen by the caller

    @property
    def mult(self) -> tuple[float, ...]:
        if self.channel_mult:
            return tuple(self.channel_mult)
        defaults = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                    64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
        if self.image_size not in defaults:
            raise ValueError(f"no default channel_mult for image_size {self.image_size}; set channel_mult")
        return defaults[self.image_size]

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def attention_ds(self) -> tuple[int, ...]:
        """Downsample factors at which attention is used (guided-diffusion stores it this way)."""
        return tuple(self.image_size // r for r in self.attention_resolutions)

    def to_flags(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mult"] = ",".join(_fmt(m) for m in self.mult)
        d["attention_resolutions"] = ",".join(str(r) for r in self.attention_resolutions)
        return d


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _csv(value: Any, cast) -> tuple:
    if value in ("", None):
        return ()
    if isinstance(value, str):
        return tuple(cast(v) for v in value.split(",") if v.strip())
    if isinstance(value, (int, float)):
        return (cast(value),)
    return tuple(cast(v) for v in value)


# Public guided-diffusion checkpoints (flags from its README) plus our own small models.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "adm-256-uncond": dict(image_size=256, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8",
                           num_head_channels=64, resblock_updown=True, use_scale_shift_norm=True,
                           learn_sigma=True, class_cond=False, use_fp16=True),
    "adm-128-cond": dict(image_size=128, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8",
                         num_heads=4, resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True,
                         class_cond=True, use_fp16=True),
    "adm-64-cond": dict(image_size=64, num_channels=192, num_res_blocks=3, attention_resolutions="32,16,8",
                        num_head_channels=64, resblock_updown=True, use_new_attention_order=True,
                        use_scale_shift_norm=True, learn_sigma=True, class_cond=True, dropout=0.1,
                        use_fp16=True),
    # Ours, for 28x28 grey images (Fashion-MNIST, digits): 28 -> 14 -> 7, attention only at 7x7
    # (attention at full resolution costs most and helps least on CPU).
    "adm-28-small": dict(image_size=28, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                         attention_resolutions="7", num_head_channels=32, resblock_updown=True,
                         use_scale_shift_norm=True),
    # A slightly wider variant for 32x32 RGB data.
    "adm-32-small": dict(image_size=32, num_channels=64, num_res_blocks=1, channel_mult="1,2,2",
                         attention_resolutions="8", num_head_channels=32, resblock_updown=True,
                         use_scale_shift_norm=True),
}


def make_config(config: str | dict[str, Any] | UNetConfig) -> UNetConfig:
    """Turn an architecture name or a dict of guided-diffusion flags into a `UNetConfig`."""
    if isinstance(config, UNetConfig):
        return config
    if isinstance(config, str):
        if config not in ARCHITECTURES:
            raise ValueError(f"unknown architecture '{config}'; known: {', '.join(ARCHITECTURES)}")
        config = ARCHITECTURES[config]
    known = {f.name for f in fields(UNetConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown U-Net flag '{unknown[0]}'; known flags: {', '.join(sorted(known))}")
    kw = dict(config)
    if "channel_mult" in kw:
        kw["channel_mult"] = _csv(kw["channel_mult"], float)
    if "attention_resolutions" in kw:
        kw["attention_resolutions"] = _csv(kw["attention_resolutions"], int)
    return UNetConfig(**kw)


@dataclass(frozen=True)
class BlockInfo:
    """One block in the paper's numbering, as recorded when the model is built (timm's feature_info)."""

    number: int  # paper numbering, 1-based: input_blocks, middle_block, output_blocks
    module: str  # module path in the state dict, e.g. "output_blocks.4"
    channels: int
    resolution: int  # spatial size (square) at the architecture's image size
