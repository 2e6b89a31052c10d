"""What to extract, and how it is cut: `FeatureRequest` ("these maps of this dataset split"), its
backbone and dataset, and `plan_parts`, which cuts it into byte-bounded parts (`PartJob`).

Plain Python (no torch): the feature coordinator, a Ray actor in every sweep, unpickles these objects,
looks them up in the store and plans their parts without paying for torch. Planning needs the U-Net's
block table; a sweep's backbone carries it (`with_block_table`), else it is built here (with torch).
`trials/features.py` computes what a request names.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from typing import Any

from trials.datasets import Sample, load_dataset
from trials.datasets.splits import sweep_splits
from trials.store import CorruptFeatureFile, FeatureKey, FeatureStore, files_digest
from trials.unet_config import BlockInfo, make_config

DEFAULT_PART_BYTES = 256 * 2 ** 20


@dataclass(frozen=True)
class BackboneSpec:
    """Which frozen U-Net: an architecture, its weights (None = random, seeded), noise schedule, and
    for class-conditional models the label it is run with (a class id, or "mean")."""

    arch: str | tuple  # architecture name, or sorted (flag, value) pairs
    checkpoint: str | None
    sha256: str
    schedule: str = "linear"
    class_label: int | str | None = None
    # The architecture's block table and parameter count, when the caller has them (`with_block_table`):
    # they travel inside every request, so a process that plans parts without building a U-Net (the
    # sweep's coordinator) needs no torch. Facts of `arch`, not part of the identity (keys, caches).
    blocks: tuple[BlockInfo, ...] = field(default=(), compare=False, repr=False)
    params: int = field(default=0, compare=False, repr=False)

    @property
    def flags(self) -> dict[str, Any]:
        return make_config(self.arch if isinstance(self.arch, str) else dict(self.arch)).to_flags()

    @property
    def arch_config(self) -> str | dict:
        return self.arch if isinstance(self.arch, str) else dict(self.arch)

    def block_table(self) -> tuple[BlockInfo, ...]:
        if self.blocks:
            return self.blocks
        from trials.blocks import block_table  # builds the U-Net on the meta device: torch

        return tuple(block_table(self.arch_config))

    def param_count(self) -> int:
        return self.params or _param_count(self.arch)


def with_block_table(spec: BackboneSpec) -> BackboneSpec:
    """`spec` carrying its architecture's block table and parameter count (see `BackboneSpec.blocks`)."""
    return replace(spec, blocks=spec.block_table(), params=spec.param_count())


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: str | None = None
    val_fraction: float = 0.1
    limits: tuple = ()  # (("train", 3000), ...) seeded stratified subsets, for quick sweeps
    skip_corrupt: bool = False
    options: tuple = ()  # loader options, e.g. (("level", "family"),)
    seed: int = 0


@functools.lru_cache(maxsize=8)
def dataset_splits(spec: DatasetSpec) -> tuple[list[str], dict[str, list[Sample]]]:
    data = load_dataset(spec.name, spec.root, **dict(spec.options))
    return data.classes, sweep_splits(data, spec.val_fraction, spec.seed, dict(spec.limits))


def preprocessing(model_flags: dict[str, Any]) -> dict[str, Any]:
    return {"image_size": model_flags["image_size"], "channels": model_flags["in_channels"],
            "resize": "shorter-side bicubic + center crop", "range": "[-1, 1]"}


@dataclass(frozen=True)
class MapShape:
    channels: int
    side: int  # stored side: the block's resolution, capped at max_spatial
    native: int  # the block's own resolution

    @property
    def bytes_per_image(self) -> int:
        return self.channels * self.side * self.side * 2  # fp16


@dataclass(frozen=True)
class FeatureRequest:
    """These maps of this dataset split: every block of `blocks` at every noise step of `ts`, one
    U-Net pass per (image, t) capturing all blocks."""

    backbone: BackboneSpec
    dataset: DatasetSpec
    split: str
    ts: tuple[int, ...]
    blocks: tuple[int, ...]
    noise_seed: int = 0
    max_spatial: int = 16
    numeric: str = "cpu-fp32"
    noise_draws: int = 1  # each map is the mean over this many seeded ε draws (one batched pass)

    @property
    def group(self) -> str:
        """What one extraction covers (for exactly-once locking and progress)."""
        ts = ",".join(map(str, self.ts))
        draws = f"/k{self.noise_draws}" if self.noise_draws != 1 else ""
        return f"{self.dataset.name}/{self.split}/t{ts}/{self.noise_seed}/{self.backbone.sha256}/{self.numeric}{draws}"

    def samples(self) -> list[Sample]:
        return dataset_splits(self.dataset)[1][self.split]

    def key(self, t: int, block: int) -> FeatureKey:
        flags = self.backbone.flags
        label = "" if self.backbone.class_label is None else str(self.backbone.class_label)
        return FeatureKey(
            checkpoint_sha256=self.backbone.sha256, model_config=json.dumps(flags, sort_keys=True),
            dataset=self.dataset.name, split=self.split,
            files_digest=_split_digest(self.dataset, self.split),
            preprocessing=json.dumps(preprocessing(flags), sort_keys=True), t=int(t), noise_seed=int(self.noise_seed),
            block=int(block), max_spatial=int(self.max_spatial), class_label=label, numeric=self.numeric,
            noise_draws=int(self.noise_draws))

    def maps(self) -> list[tuple[int, int]]:
        return [(int(t), int(b)) for t in self.ts for b in self.blocks]

    def shapes(self) -> dict[int, MapShape]:
        table = {row.number: row for row in self.backbone.block_table()}
        return {b: MapShape(table[b].channels, min(table[b].resolution, self.max_spatial), table[b].resolution)
                for b in self.blocks}

    def missing(self, store: FeatureStore, verify: bool = False) -> list["FeatureRequest"]:
        """The parts of this request not in `store`, one request per t (with `verify`, damaged keys
        are deleted and count as missing)."""
        out = []
        for t in self.ts:
            blocks = [b for b in self.blocks if not _stored(store, self.key(t, b), verify)]
            if blocks:
                out.append(replace(self, ts=(t,), blocks=tuple(blocks)))
        return out


@functools.lru_cache(maxsize=32)
def _split_digest(dataset: DatasetSpec, split: str) -> str:
    samples = dataset_splits(dataset)[1][split]
    return files_digest([s.image_id for s in samples], [s.label for s in samples])


def _stored(store: FeatureStore, key: FeatureKey, verify: bool) -> bool:
    if not store.has(key):
        return False
    if verify:
        try:
            store.read(key, verify=True)
        except CorruptFeatureFile:
            store.delete(key)
            return False
    return True


@dataclass(frozen=True)
class FillOptions:
    """How a request is cut and computed: the store, the byte bound of a part, the U-Net batch."""

    store_root: str
    part_bytes: int = DEFAULT_PART_BYTES
    batch_size: int = 256  # images per batch, and the most rows one U-Net forward takes
    compile: bool | None = None  # torch.compile the capture once per worker; None: on CUDA only


@dataclass(frozen=True)
class PartJob:
    """Images [start, stop) of a request, written as part `part` of `num_parts` of each of its keys."""

    request: FeatureRequest
    options: FillOptions
    part: int
    num_parts: int
    start: int
    stop: int


def images_per_part(request: FeatureRequest, options: FillOptions) -> int:
    """Images per part so that no key's part exceeds `part_bytes` (a whole number of batches)."""
    largest = max(s.bytes_per_image for s in request.shapes().values())
    n = max(1, options.part_bytes // largest)
    return max(options.batch_size, n // options.batch_size * options.batch_size) if n >= options.batch_size else n


def plan_parts(request: FeatureRequest, options: FillOptions, images: int | None = None) -> list[PartJob]:
    """The byte-bounded parts of `request` (of `images` images, when its files are not read here)."""
    n = len(request.samples()) if images is None else images
    per = images_per_part(request, options)
    num_parts = max(1, -(-n // per))
    return [PartJob(request, options, i, num_parts, i * per, min(n, (i + 1) * per)) for i in range(num_parts)]


def extraction_memory_bytes(request: FeatureRequest, batch_size: int) -> int:
    """Host memory one extraction task needs, for Ray's `memory=` and `diffsweep plan`: the weights
    (fp32, as loaded), the maps of two batches (one being written while the next is computed), the
    interpreter with torch and pyarrow, and on a CPU the activations of one batch (every input
    block's output is kept for the skip connections, plus working space of a few maps at the widest
    block). On a GPU the activations live in device memory, and the host holds the decoded images."""
    table = request.backbone.block_table()
    deepest = max(request.blocks)
    flags = request.backbone.flags
    params = request.backbone.param_count()
    image = flags["in_channels"] * flags["image_size"] ** 2
    if request.numeric.startswith("cuda"):
        act = image * 2  # the decoded batch and its pinned copy
    else:
        path = [r for r in table if r.number <= deepest]
        act = sum(r.channels * r.resolution ** 2 for r in path if r.module.startswith("input_blocks"))
        act += 6 * max(r.channels * r.resolution ** 2 for r in path)
        act += image * 3  # image, noise, x_t
    maps = sum(s.bytes_per_image for s in request.shapes().values()) * len(request.ts)
    return int(params * 4 + batch_size * (act * 4 + 2 * maps) + 600 * 2 ** 20)


@functools.lru_cache(maxsize=16)
def _param_count(arch: str | tuple) -> int:
    import torch

    from trials.unet import create_unet

    with torch.device("meta"):
        return sum(p.numel() for p in create_unet(arch if isinstance(arch, str) else dict(arch)).parameters())


@dataclass
class ExtractStats:
    images: int = 0
    seconds: float = 0.0
    passes: int = 0  # image passes through the U-Net
    keys: list[str] = field(default_factory=list)
    # busy seconds per stage (decode, noise, forward, write, and the loop's waits); the stages
    # overlap (decode and noise run ahead in a thread, writes behind in another), so they may sum
    # to more than `seconds`
    stages: dict[str, float] = field(default_factory=dict)
