"""An exported selection as one `torch.nn.Module`: preprocessing, seeded noising, the early-exit
U-Net and the trained head. `diffsweep predict`, `diffsweep evaluate`, `diffsweep.load` and the
MLflow model all run `Classifier.forward`, so an image gets one answer whichever way it is asked.

The noise convention (one rule for every path): the ε that noises an image to step t is drawn from
a generator seeded by (export noise_seed, the image's *noise id*, t) (`trials.diffusion.noise_seed`).
The noise id of

- an image of the export's dataset is its dataset image id, the id the feature store was built
  with (`evaluate` passes it; `predict` finds it for a file listed under the dataset's root, matched
  by path, and for datasets stored as pixel arrays — Fashion-MNIST, digits — by its pixels);
- any other image is `sha256:` + the hex sha256 of its preprocessed pixels (the C×S×S model input
  quantised back to uint8), so the same pixels give the same answer from a file, a PIL image or a
  tensor, in any batch and on any device's generator.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trials.datasets import DatasetError, load_dataset
from trials.features import class_labels, extract_batch, load_backbone


def pixel_id(pixels: np.ndarray) -> str:
    """The noise id of an image outside the dataset: sha256 of its C×S×S uint8 model-input pixels."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    h = hashlib.sha256(("x".join(map(str, pixels.shape)) + ":").encode())
    h.update(pixels.tobytes())
    return "sha256:" + h.hexdigest()


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Model input in [-1, 1] back to the uint8 pixels it was made from (exact for `to_model_input`)."""
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    return np.clip(np.rint((x.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Prediction:
    image: str
    label: str | None = None
    index: int | None = None
    top_k: tuple[tuple[str, float], ...] = ()  # (class, probability), best first
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "label": self.label, "index": self.index,
                "top_k": [{"label": c, "prob": round(p, 6)} for c, p in self.top_k]}


class Classifier(nn.Module):
    """`forward(images, image_ids=None) -> logits` for a batch of image tensors (N×C×H×W, uint8 in
    0..255 or float in [-1, 1]); `predict(...)` labels files or PIL images; `evaluate(split)` scores
    a split of the export's dataset. `classes` and `config` (the exported YAML) describe it."""

    def __init__(self, exported, device: str | torch.device = "cpu", match_dataset: bool = True):
        super().__init__()
        self.config: dict[str, Any] = exported.doc
        self.spec = exported.backbone
        f = self.config["features"]
        self.maps = [tuple(int(v) for v in m) for m in f["maps"]]
        self.noise_seed, self.max_spatial = int(f["noise_seed"]), int(f["max_spatial"])
        self.noise_draws = int(f.get("noise_draws", 1))  # exports from before noise ensembles: one draw
        self.numeric = f.get("numeric")  # the sweep's features' path (cpu-bf16 runs bf16 on a CPU here too)
        self.image_size = int(f["preprocessing"]["image_size"])
        self.channels = int(f["preprocessing"]["channels"])
        self.classes: list[str] = list(self.config["dataset"]["classes"])
        self.match_dataset = match_dataset
        # a copy of its own (not the process-wide cached one), so `.to(device)` moves only this module
        self.backbone = load_backbone.__wrapped__(self.spec, "cpu")
        self.head = exported.head
        self.to(device).eval()

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    # -- preprocessing ----------------------------------------------------------------------
    def _as_model_input(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"images: expected N×{self.channels}×H×W, got {tuple(images.shape)}")
        x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
        h, w = x.shape[-2:]
        s = self.image_size
        if (h, w) != (s, s):  # shorter side to s (bicubic), center crop; predict() uses PIL instead
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[..., top:top + s, left:left + s].clamp(-1, 1)
        return x

    def load_images(self, images: Sequence) -> tuple[np.ndarray, list[str]]:
        """Paths, PIL images or H×W(×C) uint8 arrays -> (N×C×S×S float32 in [-1, 1], noise ids), with
        the transform the store uses (Pillow: shorter side bicubic, center crop)."""
        from PIL import Image

        from trials.datasets.preprocess import open_image, to_model_input

        arrays, ids = [], []
        for image in images:
            if isinstance(image, (str, Path)):
                p = Path(image)
                if not p.is_file():
                    raise DatasetError(f"image {p}: file not found; pass paths of image files")
                x = to_model_input(open_image(p, self.channels), self.image_size)
                ids.append(self._path_index().get(str(p.resolve())) or self._pixel_noise_id(x))
            elif isinstance(image, (Image.Image, np.ndarray)):
                pil = image.convert("L" if self.channels == 1 else "RGB") if isinstance(image, Image.Image) \
                    else open_image(image, self.channels)
                x = to_model_input(pil, self.image_size)
                ids.append(self._pixel_noise_id(x))
            else:
                raise TypeError(f"predict: cannot read {type(image).__name__}; pass paths, PIL images or "
                                "uint8 arrays (tensors go to forward())")
            arrays.append(x)
        return np.stack(arrays), ids

    # -- the noise convention ---------------------------------------------------------------
    def _pixel_noise_id(self, x: np.ndarray | torch.Tensor) -> str:
        pid = pixel_id(to_uint8(x))
        return self._pixel_index().get(pid, pid)

    def noise_ids(self, x: torch.Tensor) -> list[str]:
        """The noise id of each image of a model-input batch (see the module docstring)."""
        return [self._pixel_noise_id(x[i]) for i in range(x.shape[0])]

    def _dataset_samples(self):
        if not self.match_dataset:
            return []
        d = self.config["dataset"]
        try:
            data = _dataset(d["name"], d["root"], tuple(sorted(d["options"].items())))
        except DatasetError:  # the dataset is not on this machine: every image is "any other image"
            return []
        return [s for split in ("test", "val", "train") for s in data.splits.get(split, [])]

    @functools.cached_property
    def _indexes(self) -> tuple[dict[str, str], dict[str, str]]:
        by_path: dict[str, str] = {}
        by_pixels: dict[str, str] = {}
        for s in self._dataset_samples():  # the first of equal images wins: test before val and train
            if isinstance(s.source, np.ndarray):
                by_pixels.setdefault(pixel_id(self._sample_pixels(s.source)), s.image_id)
            else:
                by_path.setdefault(str(Path(s.source).resolve()), s.image_id)
        return by_path, by_pixels

    def _path_index(self) -> dict[str, str]:
        return self._indexes[0]

    def _pixel_index(self) -> dict[str, str]:
        return self._indexes[1]

    def _sample_pixels(self, array: np.ndarray) -> np.ndarray:
        s, c = self.image_size, self.channels
        if array.dtype == np.uint8 and array.shape[:2] == (s, s):
            if c == 1 and array.ndim == 2:
                return array[None]
            if c == 3 and array.ndim == 3 and array.shape[2] == 3:
                return array.transpose(2, 0, 1)
        from trials.datasets.preprocess import open_image, to_model_input
        return to_uint8(to_model_input(open_image(array, c), s))

    # -- the forward path -------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor, image_ids: list[str] | None = None) -> torch.Tensor:
        x = self._as_model_input(images)
        ids = list(image_ids) if image_ids is not None else self.noise_ids(x)
        if len(ids) != x.shape[0]:
            raise ValueError(f"image_ids: {len(ids)} ids for {x.shape[0]} images")
        by_t: dict[int, list[int]] = {}
        for t, b in self.maps:
            by_t.setdefault(t, []).append(b)
        y = class_labels(self.spec, len(ids), self.device)
        captured = {}
        for t, blocks in by_t.items():
            for b, m in extract_batch(self.backbone, x, ids, t, blocks, self.noise_seed, self.max_spatial,
                                      self.spec.schedule, y=y, draws=self.noise_draws,
                                      numeric=self.numeric).items():
                captured[(t, b)] = m
        head_device = next(self.head.parameters()).device
        maps = [torch.from_numpy(captured[m]).float().to(head_device) for m in self.maps]
        return self.head(maps[0] if len(maps) == 1 else maps)

    def predict(self, images: Iterable, batch_size: int = 64, top_k: int = 1) -> list[Prediction]:
        """Label paths / PIL images / uint8 arrays, `batch_size` at a time. An image that cannot be
        read gets a Prediction with `error` set; the others are labelled all the same."""
        items = list(images)
        out: list[Prediction] = []
        k = max(1, min(int(top_k), len(self.classes)))
        for start in range(0, len(items), batch_size):
            arrays, ids, names, slots = [], [], [], []
            for i, item in enumerate(items[start:start + batch_size], start):
                try:
                    x, nid = self.load_images([item])
                except (DatasetError, TypeError) as e:  # this image only; the rest are labelled
                    out.append(Prediction(_name(item, i), error=str(e).splitlines()[0]))
                    continue
                arrays.append(x[0])
                ids.extend(nid)
                names.append(_name(item, i))
                slots.append(len(out))
                out.append(None)  # type: ignore[arg-type]
            if not arrays:
                continue
            probs = torch.softmax(self(torch.from_numpy(np.stack(arrays)), ids).float(), dim=1).cpu()
            p, idx = probs.topk(k, dim=1)
            for row, (slot, name) in enumerate(zip(slots, names)):
                top = tuple((self.classes[j], float(v)) for v, j in zip(p[row].tolist(), idx[row].tolist()))
                out[slot] = Prediction(name, top[0][0], int(idx[row, 0]), top)
        return out  # type: ignore[return-value]

    def evaluate(self, split: str = "test", batch_size: int = 256) -> dict[str, Any]:
        """Accuracy on a split of the export's dataset (as the sweep carved it), dataset ids as noise ids."""
        from trials.datasets.preprocess import iter_batches
        from trials.features import DatasetSpec, dataset_splits

        from orchestrator.predict import ExportError

        d = self.config["dataset"]
        spec = DatasetSpec(d["name"], d["root"], d["val_fraction"], tuple(sorted(d["limit"].items())),
                           False, tuple(sorted(d["options"].items())), d["seed"])
        _, splits = dataset_splits(spec)
        if split not in splits:
            raise ExportError(f"split '{split}' unknown; use one of {', '.join(splits)}")
        correct = total = 0
        for x, batch in iter_batches(splits[split], self.image_size, self.channels, batch_size):
            pred = self(torch.from_numpy(x), [s.image_id for s in batch]).argmax(1).cpu().numpy()
            correct += int((pred == np.array([s.label for s in batch])).sum())
            total += len(batch)
        return {"dataset": d["name"], "split": split, "n": total, "accuracy": correct / max(total, 1)}


@functools.lru_cache(maxsize=4)
def _dataset(name: str, root: str | None, options: tuple):
    return load_dataset(name, root, **dict(options))


def _name(item, i: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"<image {i}>"


def load(path: str | Path, device: str | torch.device = "cpu", match_dataset: bool = True) -> Classifier:
    """The exported selection at `path` (`exported/<dataset>.yaml`) as a Classifier on `device`."""
    from orchestrator.predict import load_exported

    return Classifier(load_exported(path), device=device, match_dataset=match_dataset)
