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


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensors reach a GPU from pinned memory, so the copy does not block the host."""
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


class DeviceCapture:
    """`capture_blocks` set up for the device the model lives on; call it with noisy batches.

    On CUDA this is the fast path: channels-last weights and activations, bf16 autocast (attention
    runs through `scaled_dot_product_attention`, i.e. flash / memory-efficient kernels), optional
    `torch.compile` (one graph per batch shape, reused by every later batch of that shape), cuDNN
    autotuning of the convolutions, inputs copied from pinned host memory without blocking, and maps
    pooled and cast to fp16 on the GPU so only the small stored feature crosses back. On the CPU it
    is plain fp32 `capture_blocks`.
    Returns {block: fp16 tensor on the host}.
    """

    def __init__(self, model: UNetModel, blocks: list[int] | tuple[int, ...], pool: int | None = None,
                 compile: bool | str = False):
        self.model, self.blocks, self.pool = model, tuple(blocks), pool
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            model.to(memory_format=torch.channels_last)
            # every batch of a job has the same shape, so cuDNN's one-off search for the fastest
            # convolution algorithm per shape is paid once and then reused
            torch.backends.cudnn.benchmark = True
        self._capture = self._eager
        if compile:  # a mode string ("reduce-overhead" = CUDA graphs, "max-autotune", ...) or True
            self._capture = torch.compile(self._eager, mode=None if compile is True else compile)

    def _eager(self, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> dict[int, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            maps = capture_blocks(self.model, xt, t, self.blocks, y=y, pool=self.pool)
        return {b: m.to(torch.float16) for b, m in maps.items()}

    @torch.no_grad()
    def __call__(self, xt: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | str | None = None) -> dict[int, torch.Tensor]:
        xt = to_device(xt, self.device)
        if self.cuda:
            xt = xt.contiguous(memory_format=torch.channels_last)
        if not torch.is_tensor(t):
            t = torch.full((xt.shape[0],), int(t), dtype=torch.long)
        t = t.to(self.device)
        if torch.is_tensor(y):
            y = y.to(self.device)
        return {b: m.cpu() for b, m in self._capture(xt, t, y).items()}
