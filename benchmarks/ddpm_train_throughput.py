"""DDPM training speed of `adm-28-small`: images/s of the training step `diffsweep train-ddpm` runs
(trials.ddpm.diffusion_loss, backward, gradient clipping, AdamW), fp32 against bf16 autocast (what
`--bf16` turns on for a CPU and what CUDA training always uses), on this machine's device. Both use
channels-last, as training does; `--compile` adds the torch.compile'd bf16 step (compile time
reported apart).

    python benchmarks/ddpm_train_throughput.py                 # batch 256, 8 timed steps each
    python benchmarks/ddpm_train_throughput.py --quick         # batch 16, 2 steps: format check
    python benchmarks/ddpm_train_throughput.py --compile

Ends with `ratio=<bf16 img/s ÷ fp32 img/s>` (`compile_ratio=` too with --compile).
"""

from __future__ import annotations

import argparse
import time

import common

import torch


def measure(bf16: bool, compile_: bool, batch: int, steps: int, device: str) -> tuple[float, float]:
    """(images/s over `steps` timed steps, seconds of the two warm-up steps)."""
    from trials.ddpm import diffusion_loss
    from trials.diffusion import NUM_TIMESTEPS, alphas_cumprod
    from trials.unet import create_unet

    torch.manual_seed(0)
    model = create_unet("adm-28-small").to(device).to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    abar = torch.as_tensor(alphas_cumprod("linear"), dtype=torch.float32, device=device)
    x0 = (torch.rand(batch, 1, 28, 28, device=device) * 2 - 1).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, NUM_TIMESTEPS, (batch,), device=device)
    noise = torch.randn(x0.shape, device=device)

    def step() -> None:
        loss = diffusion_loss(forward, x0, t, noise, abar, bf16=bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def synced() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    t0 = synced()
    for _ in range(2):
        step()
    warm = synced() - t0
    t0 = synced()
    for _ in range(steps):
        step()
    return steps * batch / (synced() - t0), warm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    batch, steps = (16, 2) if args.quick else (args.batch, args.steps)
    common.set_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"adm-28-small, batch {batch}, {steps} timed steps, {name}, torch {torch.__version__}")
    fp32, _ = measure(False, False, batch, steps, device)
    print(f"fp32 eager:     {fp32:8.1f} img/s")
    bf16, _ = measure(True, False, batch, steps, device)
    print(f"bf16 eager:     {bf16:8.1f} img/s")
    tail = f"ratio={bf16 / fp32:.2f}"
    if args.compile:
        compiled, warm = measure(True, True, batch, steps, device)
        print(f"bf16 compiled:  {compiled:8.1f} img/s (first two steps incl. compile {warm:.0f} s)")
        tail += f" compile_ratio={compiled / fp32:.2f}"
    print(tail)


if __name__ == "__main__":
    main()
