"""Training a head on stored features: recipes, one epoch, evaluation. No Ray, no MLflow here."""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trials.head_registry import head_spec
from trials.heads import build_head_for_maps
from trials.store import FeatureArray

OPTIM_PARAMS = ("lr", "weight_decay", "label_smoothing")


@dataclass(frozen=True)
class Recipe:
    name: str = "adamw"  # "paper": SGD m=0.9, step decay ×0.1 every 7 of 28 epochs; "adamw": AdamW + cosine
    epochs: int = 10
    batch_size: int = 128


def split_hparams(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(head architecture kwargs, optimisation settings)."""
    head = {k: v for k, v in params.items() if k not in OPTIM_PARAMS}
    optim = {k: v for k, v in params.items() if k in OPTIM_PARAMS}
    return head, optim


def make_optimizer(model: nn.Module, head: str, recipe: Recipe, optim: dict[str, Any]):
    wd = float(optim.get("weight_decay", 0.0 if recipe.name == "paper" else 1e-4))
    if recipe.name not in ("paper", "adamw"):
        raise ValueError(f"unknown recipe '{recipe.name}'; use 'paper' or 'adamw'")
    lr = float(optim.get("lr", head_spec(head).lr[recipe.name]))
    if recipe.name == "paper":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        step = max(1, round(recipe.epochs * 7 / 28))  # 7 of 28 epochs, scaled to shorter schedules
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step, gamma=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, recipe.epochs))
    return opt, sched


@functools.cache
def keep_batch_buffers_mapped() -> None:
    """Pin glibc's mmap threshold at its default (128 KiB) for this process.

    glibc raises the threshold after the first large block is freed; from then on every batch copy
    (128 rows of a pooled map is ~512 KiB) comes from the heap, which fragments and keeps growing with
    the number of batches: a linear-probe trial held ~1.8 kB more per training image
    (benchmarks/scale.py, 600 vs 2,400 images). Pinned, batch buffers are mapped and given back on free.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to pin
        pass


def _batch(arrays: Sequence[FeatureArray], idx: np.ndarray, device: str) -> tuple[list[torch.Tensor], np.ndarray]:
    idx = np.sort(idx)  # sorted reads walk the memory map forwards
    return [torch.from_numpy(a.take(idx)).to(device).float() for a in arrays], idx


class HeadTrainer:
    """Owns a head, its optimiser and schedule; `state_dict` round-trips exactly for resumption."""

    def __init__(self, head: str, hparams: dict[str, Any], train: Sequence[FeatureArray], num_classes: int,
                 recipe: Recipe, seed: int, device: str = "cpu", trainable: bool = True):
        self.head_name, self.recipe, self.seed, self.device = head, recipe, seed, device
        self.num_classes = num_classes
        keep_batch_buffers_mapped()
        self.train = list(train)
        head_kw, self.optim = split_hparams(hparams)
        torch.manual_seed(seed)
        self.model = build_head_for_maps(head, [a.shape[1:] for a in self.train], num_classes, **head_kw).to(device)
        # trainable=False: a trained head to restore and evaluate (the winner's export). torch builds an
        # optimiser behind a lazy import of torch._dynamo, 1.6 s of CPU a process pays once: not for that
        self.opt, self.sched = make_optimizer(self.model, head, recipe, self.optim) if trainable else (None, None)
        self.epoch = 0
        self.labels = torch.from_numpy(self.train[0].labels.astype(np.int64))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda")):
            return self.model(maps[0] if len(maps) == 1 else maps).float()

    def train_epoch(self) -> float:
        """One epoch; the batch order and dropout depend only on (seed, epoch), so resuming is exact."""
        self.model.train()
        rng = np.random.default_rng([self.seed, self.epoch])
        torch.manual_seed(self.seed * 100_003 + self.epoch)
        order = rng.permutation(len(self.labels))
        total, count = 0.0, 0
        smoothing = float(self.optim.get("label_smoothing", 0.0))
        for start in range(0, len(order), self.recipe.batch_size):
            idx = order[start:start + self.recipe.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            maps, idx = _batch(self.train, idx, self.device)
            y = self.labels[idx].to(self.device)
            loss = F.cross_entropy(self.forward(maps), y, label_smoothing=smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        self.sched.step()
        self.epoch += 1
        return total / max(count, 1)

    @torch.no_grad()
    def logits(self, arrays: Sequence[FeatureArray], batch_size: int = 512) -> torch.Tensor:
        """N × classes, in the arrays' order, on the CPU."""
        self.model.eval()
        out = []
        for start in range(0, len(arrays[0]), batch_size):
            idx = np.arange(start, min(start + batch_size, len(arrays[0])))
            maps, _ = _batch(arrays, idx, self.device)
            out.append(self.forward(maps).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    def predict(self, arrays: Sequence[FeatureArray], batch_size: int = 512) -> np.ndarray:
        return self.logits(arrays, batch_size).argmax(1).numpy()

    def accuracy(self, arrays: Sequence[FeatureArray]) -> float:
        return float((self.predict(arrays) == arrays[0].labels).mean())

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.opt is not None:
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])
        self.epoch = int(state["epoch"])

    def epochs(self, val: Sequence[FeatureArray]) -> Iterator[dict[str, float]]:
        """Train to `recipe.epochs`, yielding metrics after each epoch."""
        while self.epoch < self.recipe.epochs:
            loss = self.train_epoch()
            yield {"epoch": self.epoch, "train_loss": loss, "val_acc": self.accuracy(val)}
