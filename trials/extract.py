"""Single-pass, multi-block feature capture that stops after the deepest block it needs."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F

from trials.unet import UNetModel


def capture_blocks(model: UNetModel, x: torch.Tensor, t: torch.Tensor | int, blocks: list[int] | tuple[int, ...],
                   y: torch.Tensor | None = None, pool: int | None = None) -> dict[int, torch.Tensor]:
    """Run `model` on the noisy input `x` at step `t` (an int, or one step per sample), returning
    {block number: output} for `blocks`.

    The model's own `forward_intermediates` with `stop_early`: blocks use the paper's 1-based
    numbering and nothing after the deepest requested block runs (no later blocks, no output head).
    With `pool`, each map is adaptive-average-pooled to at most pool×pool in the same call (maps
    already smaller are kept as they are).
    """
    maps = model.forward_intermediates(x, t, tuple(blocks), y=y, stop_early=True)
    if pool is not None:
        maps = {b: F.adaptive_avg_pool2d(h, pool) if h.shape[-1] > pool else h for b, h in maps.items()}
    return maps


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensors reach a GPU from pinned memory, so the copy does not block the host."""
    if device.type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


class Captured:
    """The maps of one submitted batch; `result()` waits for them (on CUDA: for the async copy)."""

    def __init__(self, maps: dict[int, torch.Tensor], rows: int, event=None):
        self._maps, self._rows, self._event = maps, rows, event

    def result(self) -> dict[int, torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return {b: m[:self._rows] for b, m in self._maps.items()}


class DeviceCapture:
    """`capture_blocks` set up for the device the model lives on; call it with noisy batches.

    On CUDA this is the fast path: channels-last weights and activations, bf16 autocast (attention
    runs through `scaled_dot_product_attention`, i.e. flash / memory-efficient kernels), optional
    `torch.compile` (one graph for the batch shape, reused by every later batch), cuDNN autotuning
    of the convolutions, inputs copied from pinned host memory without blocking, and maps pooled and
    cast to fp16 on the GPU so only the small stored feature crosses back, asynchronously
    (`submit` returns at once; `Captured.result()` waits). On the CPU it is fp32 `capture_blocks`
    (bf16 autocast with `bf16=True`: oneDNN's bf16 convolutions, which the store fill asks for on
    CPUs with bf16 units, see `trials.features.numeric_path`), compiled when asked.
    With `rows` set (the fill does so when compiled), smaller batches are padded to `rows` so the
    compiled graph is never rebuilt for a short last batch.
    Returns {block: fp16 tensor on the host}.
    """

    def __init__(self, model: UNetModel, blocks: list[int] | tuple[int, ...], pool: int | None = None,
                 compile: bool | str = False, rows: int | None = None, bf16: bool | None = None):
        self.model, self.blocks, self.pool, self.rows = model, tuple(blocks), pool, rows
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.bf16 = self.cuda if bf16 is None else bool(bf16)  # bf16 autocast: always on CUDA, asked on a CPU
        self.compiled = bool(compile)
        if self.cuda:
            model.to(memory_format=torch.channels_last)
            # every batch of a job has the same shape, so cuDNN's one-off search for the fastest
            # convolution algorithm per shape is paid once and then reused
            torch.backends.cudnn.benchmark = True
        self._capture = self._eager
        if compile:  # a mode string ("reduce-overhead" = CUDA graphs, "max-autotune", ...) or True
            self._capture = torch.compile(self._eager, mode=None if compile is True else compile, dynamic=False)

    def _eager(self, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> dict[int, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            maps = capture_blocks(self.model, xt, t, self.blocks, y=y, pool=self.pool)
        return {b: m.to(torch.float16) for b, m in maps.items()}

    @torch.no_grad()
    def submit(self, xt: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | str | None = None) -> Captured:
        n = xt.shape[0]
        xt = to_device(xt, self.device)
        if not torch.is_tensor(t):
            t = torch.full((n,), int(t), dtype=torch.long)
        t = t.to(self.device).expand(n)
        if torch.is_tensor(y):
            y = y.to(self.device)
        if self.rows is not None and n < self.rows:  # pad to the compiled shape
            pad = self.rows - n
            xt = torch.cat([xt, xt.new_zeros((pad, *xt.shape[1:]))])
            t = torch.cat([t, t[:1].expand(pad)])
            if torch.is_tensor(y):
                y = torch.cat([y, y[:1].expand(pad)])
        if self.cuda:
            xt = xt.contiguous(memory_format=torch.channels_last)
        maps = self._capture(xt, t, y)
        if not self.cuda:
            return Captured({b: m.cpu() for b, m in maps.items()}, n)
        host = {b: m[:n].to("cpu", non_blocking=True) for b, m in maps.items()}  # pinned, async
        event = torch.cuda.Event()
        event.record()
        return Captured(host, n, event)

    def __call__(self, xt: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | str | None = None) -> dict[int, torch.Tensor]:
        return self.submit(xt, t, y).result()


_CAPTURES: "OrderedDict[tuple, DeviceCapture]" = OrderedDict()
_CAPTURES_LOCK = threading.Lock()


def cached_capture(model: UNetModel, blocks, pool: int | None = None, compile: bool | str = False,
                   rows: int | None = None, bf16: bool | None = None) -> DeviceCapture:
    """One `DeviceCapture` per (model, blocks, pool, compile mode, batch shape, arithmetic) in this
    process, kept across batches, parts and keys, so a compiled graph is built once per worker and reused."""
    if bf16 is None:  # the device's default, resolved before keying: None and its value are one extractor
        bf16 = next(model.parameters()).device.type == "cuda"
    key = (id(model), tuple(sorted(set(int(b) for b in blocks))), pool, compile, rows if compile else None, bool(bf16))
    with _CAPTURES_LOCK:
        capture = _CAPTURES.get(key)
        if capture is not None and capture.model is model:
            _CAPTURES.move_to_end(key)
            return capture
        capture = DeviceCapture(model, key[1], pool=pool, compile=compile, rows=key[4], bf16=bf16)
        _CAPTURES[key] = capture
        while len(_CAPTURES) > 8:
            _CAPTURES.popitem(last=False)
        return capture
