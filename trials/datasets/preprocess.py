"""Image decoding and the model's input transform, without torchvision.

RGB (or grey for 1-channel models), resize shorter side + center crop to the model's size, scale to
[-1, 1]. Decoding streams in a thread pool (Pillow releases the GIL), so a large dataset never sits
in memory: only `batch_size` images at a time.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from trials.datasets.base import DatasetError, Sample


def open_image(source: Path | np.ndarray, channels: int) -> Image.Image:
    if isinstance(source, np.ndarray):
        image = Image.fromarray(source)
    else:
        try:
            with Image.open(source) as im:
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise DatasetError(f"image {source} cannot be decoded ({type(e).__name__}); replace the file "
                               "or set skip_corrupt: true") from None
    return image.convert("L" if channels == 1 else "RGB")


def to_model_input(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size`, center-crop size×size, scale to [-1, 1]; C×H×W float32."""
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def random_resized_crop_flip(image: Image.Image, size: int, rng: np.random.Generator,
                             scale: tuple[float, float] = (0.08, 1.0)) -> Image.Image:
    """The paper's augmentation (Inception-style crop + horizontal flip), seeded by `rng`."""
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            image = image.crop((left, top, left + cw, top + ch))
            break
    image = image.resize((size, size), Image.BICUBIC)
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def load_one(sample: Sample, size: int, channels: int) -> np.ndarray:
    return to_model_input(open_image(sample.source, channels), size)


def iter_batches(samples: list[Sample], size: int, channels: int, batch_size: int, workers: int = 4,
                 skip_corrupt: bool = False) -> Iterator[tuple[np.ndarray, list[Sample]]]:
    """Yield (N×C×H×W float32 in [-1, 1], samples) batches in order, decoding in parallel."""
    def decode(sample: Sample) -> np.ndarray | None:
        try:
            return load_one(sample, size, channels)
        except DatasetError:
            if skip_corrupt:
                return None
            raise

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            arrays = list(pool.map(decode, chunk))
            kept = [(a, s) for a, s in zip(arrays, chunk) if a is not None]
            if kept:
                yield np.stack([a for a, _ in kept]), [s for _, s in kept]


T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 2, prepare: Callable[[T], T] | None = None) -> Iterator[T]:
    """Run `items` (and `prepare` on each) in a background thread, up to `depth` items ahead, so
    decoding and resizing the next batch overlap the compute of this one. Errors surface in order;
    closing the iterator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(prepare(item) if prepare else item):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    thread = threading.Thread(target=run, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)
