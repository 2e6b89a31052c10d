"""Train our own small ADM U-Net as an ε-prediction DDPM (the quickstart's shipped backbone).

Checkpoints are the EMA weights as safetensors (guided-diffusion state-dict names) plus a JSON
sidecar with everything needed to rebuild and verify them; a `.resume.pt` beside them holds the
optimizer and raw weights so training continues where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trials.diffusion import NUM_TIMESTEPS, alphas_cumprod
from trials.unet import create_unet, make_config


@dataclass
class DDPMTrainConfig:
    dataset: str = "fashion_mnist"
    arch: str = "adm-28-small"
    out: str = "ddpm.safetensors"
    root: str | None = None
    steps: int = 2000
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 100
    ema_decay: float = 0.999
    schedule: str = "linear"
    seed: int = 0
    save_every: int = 250
    samples: int = 64  # images in the PNG grid written with each checkpoint (0 = none)
    compile: bool = False  # torch.compile; worth it on a GPU, and on a CPU with bf16
    bf16: bool = False  # bf16 autocast on a CPU too (always on with CUDA); pays on CPUs with AMX or AVX-512 BF16
    max_minutes: float | None = None  # stop (with a checkpoint) once this much training time has passed
    init_from: str | None = None  # start from these weights (fresh optimizer) instead of a random init


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _training_images(cfg: DDPMTrainConfig, size: int, channels: int) -> torch.Tensor:
    """The whole train split as uint8 N×C×H×W (small datasets only: Fashion-MNIST is 47 MB)."""
    from trials.datasets import load_dataset
    from trials.datasets.preprocess import iter_batches

    data = load_dataset(cfg.dataset, cfg.root)
    batches = [x for x, _ in iter_batches(data.splits["train"], size, channels, batch_size=4096)]
    return torch.from_numpy(((np.concatenate(batches) + 1) * 127.5).round().astype(np.uint8))


def diffusion_loss(forward, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor,
                   bf16: bool) -> torch.Tensor:
    """ε-prediction MSE at steps t: the network sees x_t = √ᾱ·x0 + √(1-ᾱ)·ε and must return ε.
    bf16 autocast covers the forward only; the loss is taken in fp32."""
    a = abar[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with torch.autocast(device_type=x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        pred = forward(xt, t)[:, : x0.shape[1]]
    return F.mse_loss(pred.float(), noise)


@torch.no_grad()
def ddim_sample(model, n: int, steps: int = 50, schedule: str = "linear", seed: int = 0) -> torch.Tensor:
    """Deterministic DDIM (η=0) on an evenly strided subset of the 1000 steps; returns images in [-1, 1]."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, cfg.in_channels, cfg.image_size, cfg.image_size), generator=gen)
    abar = torch.as_tensor(alphas_cumprod(schedule), dtype=torch.float32)
    ts = np.linspace(NUM_TIMESTEPS - 1, 0, steps).round().astype(int)
    for i, t in enumerate(ts):
        eps = model(x, torch.full((n,), int(t)))[:, : cfg.in_channels]
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def save_grid(images: torch.Tensor, path: Path) -> None:
    from PIL import Image

    n, c, h, w = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = pixels[i]
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def init_lineage(cfg: DDPMTrainConfig) -> dict | None:
    """What `--init-from` starts from: its sha256 and, from its sidecar, the steps and command that made
    it, so a continued checkpoint still says how to rebuild it from scratch."""
    if not cfg.init_from:
        return None
    from trials.unet import CheckpointError

    path = Path(cfg.init_from)
    if path.resolve() == Path(cfg.out).resolve():
        raise CheckpointError(f"--init-from {path}: is also --out; write the continued run to a new path")
    if not path.is_file():
        raise CheckpointError(f"--init-from {path}: file not found; pass a checkpoint written by train-ddpm")
    side_path = path.with_suffix(".json")
    side = json.loads(side_path.read_text()) if side_path.is_file() else {}
    for key, want in (("arch", cfg.arch), ("schedule", cfg.schedule)):
        if side.get(key, want) != want:
            raise CheckpointError(f"--init-from {path}: its sidecar says {key} {side[key]}, this run uses {want}; "
                                  f"pass --{key} {side[key]}")
    before = side.get("total_steps", side.get("steps"))
    return {"path": str(path), "sha256": sha256_file(path), "steps": before, "command": side.get("command")}


def save_checkpoint(ema, model, opt, step: int, cfg: DDPMTrainConfig, seconds: float, losses: list[float],
                    lineage: dict | None = None) -> Path:
    """EMA weights (safetensors), the sidecar, and the resume state. `command` in the sidecar is the
    invocation that reproduces exactly these `step` steps (a time-limited run records where it stopped);
    a run started with `--init-from` also records what it started from and the steps in total."""
    from safetensors.torch import save_file

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp))
    tmp.replace(out)  # atomic: a reader never sees half a checkpoint
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.processor() or 'cpu'} " \
                                                                               f"({torch.get_num_threads()} threads)"
    sidecar = {
        "arch": cfg.arch, "flags": make_config(cfg.arch).to_flags(), "schedule": cfg.schedule,
        "diffusion_steps": NUM_TIMESTEPS, "dataset": cfg.dataset, "steps": step, "batch_size": cfg.batch_size,
        "seed": cfg.seed, "sha256": sha256_file(out), "train_seconds": round(seconds, 1), "hardware": device,
        "final_loss": float(np.mean(losses[-50:])) if losses else None, "weights": "ema",
        "command": f"diffsweep train-ddpm --dataset {cfg.dataset} --arch {cfg.arch} --steps {step} "
                   f"--batch-size {cfg.batch_size} --lr {cfg.lr:g} --seed {cfg.seed}"
                   f"{' --compile' if cfg.compile else ''}{' --bf16' if cfg.bf16 else ''}"
                   f"{f' --init-from {cfg.init_from}' if cfg.init_from else ''} --out {cfg.out}",
        "train_config": asdict(cfg),
    }
    if lineage:
        sidecar["init_from"] = lineage
        sidecar["total_steps"] = (lineage["steps"] or 0) + step
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                "seconds": seconds, "losses": losses, "init_from": lineage}, out.with_suffix(".resume.pt"))
    return out


def train_ddpm(cfg: DDPMTrainConfig, progress: bool = True) -> Path:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ucfg = make_config(cfg.arch)
    model = create_unet(cfg.arch).to(device).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, seconds, losses = 0, 0.0, []
    resume = Path(cfg.out).with_suffix(".resume.pt")
    if resume.exists():
        state = torch.load(resume, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, seconds, losses = state["step"], state["seconds"], list(state["losses"])
        # the lineage recorded when the run started (the --init-from file may have changed or gone since);
        # resume files written before it was kept there fall back to reading it again
        lineage = state.get("init_from") or init_lineage(cfg)
    else:
        lineage = init_lineage(cfg)
        if lineage:
            from trials.unet import load_checkpoint

            # Continue from trained weights: the EMA starts there too, the optimizer starts fresh (and warms up)
            weights = load_checkpoint(cfg.init_from, cfg.arch).state_dict()
            model.load_state_dict(weights)
            ema.load_state_dict(weights)
    # The whole train split lives on the device (47 MB for Fashion-MNIST) and batches, steps and
    # noise are drawn there: a GPU step then never waits on the host.
    images = _training_images(cfg, ucfg.image_size, ucfg.in_channels).to(device)
    abar = torch.as_tensor(alphas_cumprod(cfg.schedule), dtype=torch.float32, device=device)
    forward = torch.compile(model) if cfg.compile else model
    gen = torch.Generator(device).manual_seed(cfg.seed * 100003 + step)  # resumed runs draw fresh batches
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    out, saved_at = Path(cfg.out), -1
    pending: list[torch.Tensor] = []  # losses still on the device: read them in bulk, not once per step
    deadline = seconds + 60 * cfg.max_minutes if cfg.max_minutes else float("inf")
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, unit="step")
    t0 = time.perf_counter()
    while step < cfg.steps and seconds + time.perf_counter() - t0 < deadline:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen, device=device)
        x0 = (images[idx].float() / 127.5 - 1).contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, NUM_TIMESTEPS, (cfg.batch_size,), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        loss = diffusion_loss(forward, x0, t, noise, abar, bf16=device == "cuda" or cfg.bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model_params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1 - cfg.ema_decay)
        step += 1
        pending.append(loss.detach())
        if len(pending) == 50 or step % cfg.save_every == 0 or step == cfg.steps:
            losses.extend(torch.stack(pending).tolist())  # one device sync per 50 steps
            pending.clear()
            now = time.perf_counter()
            seconds, t0 = seconds + now - t0, now
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}",
                            img_s=f"{step * cfg.batch_size / max(seconds, 1e-9):.0f}")
        if step % cfg.save_every == 0:
            out = save_checkpoint(ema, model, opt, step, cfg, seconds, losses, lineage)
            saved_at = step
    if pending:
        losses.extend(torch.stack(pending).tolist())
        seconds += time.perf_counter() - t0
    bar.update(step - bar.n)
    bar.close()
    if saved_at != step:
        out = save_checkpoint(ema, model, opt, step, cfg, seconds, losses, lineage)
    if cfg.samples:
        save_grid(ddim_sample(ema.cpu().float(), cfg.samples, schedule=cfg.schedule, seed=cfg.seed),
                  out.with_suffix(".samples.png"))
    return out
