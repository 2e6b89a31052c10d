"""The sweep YAML as typed pydantic models, validated before Ray starts.

Every error names the YAML path of the bad field (e.g. `space.t[2]`) and what would fix it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

from trials.constants import NUM_TIMESTEPS
from trials.head_registry import HEADS, REGISTRY

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent.parent / "trials" / "checkpoints" / \
    "adm-28-small-fashion_mnist.safetensors"


class ConfigError(ValueError):
    """A sweep spec that cannot run; the message is one line naming the field and the fix."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(Strict):
    """A numeric hyper-parameter: `suggest_float(name, low, high, log=log)`, or `suggest_int` with type: int."""

    low: float
    high: float
    log: bool = False
    type: Literal["float", "int"] = "float"

    @model_validator(mode="after")
    def _order(self) -> "Range":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


# A hyper-parameter is a list of choices (suggest_categorical) or a numeric range.
Param = Union[list[Any], Range]


class Checkpoint(Strict):
    path: str | None = None  # None = the shipped small DDPM
    arch: str | dict[str, Any] = "adm-28-small"
    schedule: Literal["linear", "cosine"] = "linear"
    random_weights: bool = False  # baseline: the same U-Net, untrained (seeded)
    # class-conditional models (adm-64-cond, adm-128-cond): the label every image is run with, a class
    # id or "mean" (the mean label embedding); part of the feature key
    class_label: int | Literal["mean"] | None = None


class DatasetConfig(Strict):
    name: str
    root: str | None = None
    val_fraction: float = Field(0.1, gt=0, lt=1)
    limit: dict[Literal["train", "val", "test"], int] = {}
    skip_corrupt: bool = False
    options: dict[str, Any] = {}


class Space(Strict):
    """The search space; read it as a list of `trial.suggest_*` calls."""

    t: list[int]
    block: list[int]
    pool: list[int] = [1]
    head: dict[str, dict[str, Param]]
    concat_maps: list[list[tuple[int, int]]] = []  # for head "concat": sets of (t, block) maps
    fusion_maps: list[list[tuple[int, int]]] = []  # for head "fusion": sets of (t, block) maps
    mixing_maps: list[list[tuple[int, int]]] = []  # for head "mixing"; none listed = every t × block above
    # each feature is the mean over k seeded ε draws, k searched from this list (DIFT's ensemble)
    noise_draws: list[int] = [1]

    @field_validator("t")
    @classmethod
    def _t(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("empty list; give at least one noise step")
        for i, t in enumerate(v):
            if not 0 <= t < NUM_TIMESTEPS:
                raise ValueError(f"[{i}] = {t} is outside the schedule; use 0..{NUM_TIMESTEPS - 1}")
        return v

    @field_validator("block", "pool")
    @classmethod
    def _nonempty(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("empty list; give at least one value")
        return v

    @field_validator("noise_draws")
    @classmethod
    def _draws(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("empty list; give at least one ensemble size (1 = one ε draw)")
        for i, k in enumerate(v):
            if k < 1:
                raise ValueError(f"[{i}] = {k}; an ensemble has at least one draw")
        return v

    @field_validator("t", "block", "pool", "noise_draws")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        # a repeated choice is a duplicate grid point (and doubles its weight for the sampler)
        for i, x in enumerate(v):
            if x in v[:i]:
                raise ValueError(f"[{i}] = {x} is listed twice; remove the repeat")
        return v

    @field_validator("head")
    @classmethod
    def _heads(cls, v: dict) -> dict:
        if not v:
            raise ValueError("no heads; name at least one of " + ", ".join(HEADS))
        for name in v:
            if name not in HEADS:
                raise ValueError(f"unknown head '{name}'; use one of {', '.join(HEADS)}")
        return v

    @model_validator(mode="after")
    def _map_sets(self) -> "Space":
        for name in self.head:
            spec = REGISTRY[name]
            if spec.multi_map and not self.map_sets(name):
                raise ValueError(f"head '{name}' needs {spec.maps_field}: a list of [[t, block], ...] sets")
        return self

    def map_sets(self, head: str) -> list[list[tuple[int, int]]]:
        """The (t, block) map sets a head that reads several maps chooses from ([] for the others)."""
        spec = REGISTRY[head]
        if not spec.multi_map:
            return []
        listed = [[(int(t), int(b)) for t, b in maps] for maps in getattr(self, spec.maps_field)]
        if listed or not spec.all_maps_by_default:
            return listed
        return [[(t, b) for t in self.t for b in self.block]]  # every map the space captures, t-major

    def listed_map_sets(self) -> dict[str, list[list[tuple[int, int]]]]:
        """Space field -> its map sets as written, for the heads that read several maps."""
        return {s.maps_field: getattr(self, s.maps_field) for s in REGISTRY.values() if s.maps_field}


class Asha(Strict):
    max_t: int = Field(8, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3, gt=1)


class Search(Strict):
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    seed: int = 0
    # trials per dataset (grid: ignored, every config runs once); 48 with ASHA reduction factor 3, chosen
    # on digits (benchmarks/search_efficiency.py: 24 gave a median gap of 0.18 points, 48 none)
    num_samples: int = Field(48, ge=1)
    max_concurrent: int = Field(2, ge=1)
    metric: Literal["val_acc"] = "val_acc"
    asha: Asha | None = Asha()
    warm_start: list[dict[str, Any]] = []
    optuna_storage: str | None = None  # e.g. sqlite:///optuna.db, to inspect with optuna-dashboard
    # Tune's FailureConfig: restarts of a failed trial from its last checkpoint (a killed worker, a lost
    # node); -1 retries forever, 0 fails a trial at its first error
    max_failures: int = Field(3, ge=-1)


class Training(Strict):
    recipe: Literal["paper", "adamw"] = "adamw"
    batch_size: int = Field(128, ge=2)
    # checkpoints per trial that keep their weights (older ones keep only their epoch, see
    # orchestrator/checkpoints.py): the latest is what resume and the winner's export need
    checkpoints_to_keep: int = Field(1, ge=1)


class Resources(Strict):
    cpu: float = Field(1, ge=0)
    gpu: float = Field(0, ge=0)
    extract_cpu: float = Field(0, ge=0)  # 0 lets extraction run beside trials that hold every CPU
    extract_gpu: float = Field(0, ge=0)


class Store(Strict):
    path: str = "runs/features"
    max_spatial: int = Field(16, ge=1)
    part_bytes: ByteSize = Field(ByteSize(256 * 2 ** 20), gt=0)  # bound on one stored part ("256MiB", "1GB")
    batch_size: int = Field(256, ge=1)
    # the arithmetic of the features, part of their keys; auto: cuda-bf16 when extract_gpu > 0, else
    # cpu-bf16 (bf16 autocast) on CPUs with bf16 units (AVX512-BF16 or AMX; the fill at 1.4-1.6x fp32
    # on a Zen 4), cpu-fp32 on others
    numeric: Literal["auto", "cpu-fp32", "cpu-bf16", "cuda-bf16"] = "auto"
    # torch.compile the extractor, once per worker process (null: on when extraction runs on CUDA)
    compile: bool | None = None


class Selection(Strict):
    # export the k best completed trials of each dataset as one ensemble (mean of their class
    # probabilities) when it beats the best single trial on validation; 1: the best trial alone
    ensemble: int = Field(1, ge=1, le=16)
    # the bar a selection must reach on validation before the test split is read for it: below it the
    # sweep reports the selection and neither tests nor exports it, so a sweep that cannot replace a
    # shipped result spends no test evaluation. One bar for every dataset, or {dataset: bar} (a dataset
    # left out has none); None: every selection is tested and exported
    min_val_acc: float | dict[str, float] | None = None

    @field_validator("min_val_acc")
    @classmethod
    def _fraction(cls, v: float | dict[str, float] | None) -> float | dict[str, float] | None:
        for name, bar in (v.items() if isinstance(v, dict) else [(None, v)]):
            if bar is not None and not 0 < bar <= 1:
                where = f"{name} = " if name else ""
                raise ValueError(f"{where}{bar} is not an accuracy in (0, 1]; write 0.94 for 94 %")
        return v

    def bar(self, dataset: str) -> float | None:
        return self.min_val_acc.get(dataset) if isinstance(self.min_val_acc, dict) else self.min_val_acc


class Tracking(Strict):
    # MLflow's own MLFLOW_TRACKING_URI wins over the built-in default (a local sqlite file)
    uri: str = Field(default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns.db"))
    experiment: str | None = None  # default: the sweep name


class SweepConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    noise_seed: int = 0
    checkpoint: Checkpoint = Checkpoint()
    datasets: list[DatasetConfig]
    space: Space
    search: Search = Search()
    training: Training = Training()
    resources: Resources = Resources()
    store: Store = Store()
    tracking: Tracking = Tracking()
    selection: Selection = Selection()
    storage_path: str = "runs/ray"
    export_dir: str = "exported"

    @model_validator(mode="after")
    def _warm_start_keys(self) -> "SweepConfig":
        """A warm start names the space's own parameters: head, t, block, pool, <head>.<param>."""
        for i, point in enumerate(self.search.warm_start):
            head = point.get("head")
            if head not in self.space.head:
                raise ValueError(f"search.warm_start[{i}].head: {head!r} is not a head of the space; use one "
                                 f"of {', '.join(self.space.head)}")
            sets = (f"{head}.set", f"{head}.maps") if REGISTRY[head].multi_map else ()
            known = {"head", "t", "block", "pool", "noise_draws", *sets,
                     *(f"{head}.{p}" for p in self.space.head[head])}
            for key in point:
                if key not in known:
                    raise ValueError(f"search.warm_start[{i}].{key}: not a parameter of head '{head}' in the "
                                     f"space; use one of {', '.join(sorted(known))}")
        return self

    @model_validator(mode="after")
    def _bars_name_datasets(self) -> "SweepConfig":
        bars = self.selection.min_val_acc
        unknown = sorted(set(bars) - {d.name for d in self.datasets}) if isinstance(bars, dict) else []
        if unknown:
            raise ValueError(f"selection.min_val_acc.{unknown[0]}: not a dataset of this sweep; use one of "
                             f"{', '.join(d.name for d in self.datasets)}")
        return self

    @model_validator(mode="after")
    def _numeric_where_extraction_runs(self) -> "SweepConfig":
        if self.store.numeric.startswith("cpu") and self.resources.extract_gpu > 0:
            raise ValueError(f"store.numeric: {self.store.numeric} is computed on CPUs, but resources.extract_gpu "
                             f"runs extraction on GPUs; set extract_gpu: 0, or numeric: auto")
        return self

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, v: list[DatasetConfig]) -> list[DatasetConfig]:
        from trials.datasets import REGISTRY
        if not v:
            raise ValueError("no datasets; list at least one")
        for i, d in enumerate(v):
            if d.name not in REGISTRY:
                raise ValueError(f"[{i}].name '{d.name}' is not a known dataset; known: {', '.join(REGISTRY)}")
        names = [d.name for d in v]
        if len(set(names)) != len(names):
            raise ValueError("a dataset is listed twice")
        return v

    @property
    def epochs(self) -> int:
        return self.search.asha.max_t if self.search.asha else 8

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    def checkpoint_path(self) -> Path | None:
        if self.checkpoint.random_weights:
            return None
        return Path(self.checkpoint.path).expanduser() if self.checkpoint.path else SHIPPED_CHECKPOINT

    def check_blocks(self) -> None:
        """Blocks must exist in the architecture, and a class-conditional one needs its label (needs
        the U-Net code, so it runs after parsing)."""
        from trials.blocks import num_blocks
        from trials.unet_config import make_config
        try:
            n = num_blocks(self.checkpoint.arch)
            flags = make_config(self.checkpoint.arch)
        except ValueError as e:
            raise ConfigError(f"checkpoint.arch: {e}") from None
        label = self.checkpoint.class_label
        if flags.class_cond and label is None:
            raise ConfigError(f"checkpoint.class_label: architecture {self.checkpoint.arch} is class-conditional; "
                              f"set a class id (0..{flags.num_classes - 1}) or 'mean' (the mean label embedding)")
        if not flags.class_cond and label is not None:
            raise ConfigError(f"checkpoint.class_label: architecture {self.checkpoint.arch} is unconditional; "
                              "remove class_label")
        if isinstance(label, int) and not 0 <= label < flags.num_classes:
            raise ConfigError(f"checkpoint.class_label: {label} is outside 0..{flags.num_classes - 1}")
        from trials.heads import head_hyperparameters  # the heads' own constructors say what they take
        from trials.train_head import OPTIM_PARAMS
        for name, params in self.space.head.items():
            known = (*head_hyperparameters(name), *OPTIM_PARAMS)
            for param in params:
                if param not in known:
                    raise ConfigError(f"space.head.{name}.{param}: head '{name}' has no parameter '{param}'; "
                                      f"use one of {', '.join(known)}")
        self._check_head_values()
        for i, b in enumerate(self.space.block):
            if not 1 <= b <= n:
                raise ConfigError(f"space.block[{i}] = {b}: architecture {self.checkpoint.arch} has blocks 1..{n}; "
                                  "see `diffsweep blocks --arch ...`")
        self._check_pools()
        for field, sets in self.space.listed_map_sets().items():
            for i, maps in enumerate(sets):
                for t, b in maps:
                    if not 1 <= b <= n or not 0 <= t < NUM_TIMESTEPS:
                        raise ConfigError(f"space.{field}[{i}]: ({t}, {b}) needs t in 0..{NUM_TIMESTEPS - 1} and "
                                          f"block in 1..{n}")

    def _check_head_values(self) -> None:
        """Every listed combination of a head's parameters must build the head. Each is built once on
        the meta device (no memory; stand-in 8×4×4 maps, as the constructors' checks are on the values),
        so a value a constructor refuses is one line here rather than an error in every trial."""
        import itertools

        import torch

        from trials.head_registry import REGISTRY
        from trials.heads import build_head_for_maps
        from trials.train_head import split_hparams
        for name, params in self.space.head.items():
            spec = REGISTRY[name]
            listed = {k: v for k, v in params.items() if not isinstance(v, Range)}
            shapes = [(8, 4, 4)] * (2 if spec.multi_map else 1)
            for values in itertools.islice(itertools.product(*listed.values()), 256):
                kw, _ = split_hparams(dict(zip(listed, values)))
                if spec.pooled:
                    kw["pool"] = 1
                if spec.takes_maps:
                    kw["maps"] = [[10, 1], [10, 2]]
                try:
                    with torch.device("meta"):
                        build_head_for_maps(name, shapes, 2, **kw)
                except (ValueError, TypeError) as e:
                    raise ConfigError(f"space.head.{name}: {dict(zip(listed, values))} does not build a head: {e}; "
                                      "change or remove that value") from None

    def _check_pools(self) -> None:
        """Two pools that give a block the same pooled side would train the same head twice.

        A pooled head reads `adaptive_avg_pool2d(map, min(pool, side))` (trials/pooled.py `pooled_side`,
        trials/heads.py), where side is the block's resolution capped at store.max_spatial (what
        `diffsweep blocks --max-spatial` shows). Every pool at or above the side therefore gives the
        map itself: one such pool is fine (it is the identity), two are duplicate trials. Every
        dataset is resized to the architecture's image size, so the sides, and this check, hold for all
        datasets alike. The suggested fix keeps the pools below the space's smallest side and the smallest
        pool at or above it: with at most one entry at or above the smallest side, there is at most one
        at or above any larger side, so the fix passes this check for every block."""
        from trials.blocks import block_table
        if not any(REGISTRY[h].pooled for h in self.space.head):
            return  # no head reads `pool`: Optuna never suggests it
        table = {r.number: r for r in block_table(self.checkpoint.arch)}
        sides = {b: min(table[b].resolution, self.store.max_spatial) for b in self.space.block}
        datasets = ", ".join(d.name for d in self.datasets)
        # the block with the smallest side collapses the most pools: if it collapses none, no block does
        b = min(sides, key=lambda b: (sides[b], b))
        side = sides[b]
        at_or_above = sorted(p for p in self.space.pool if p >= side)
        if len(at_or_above) < 2:
            return
        keep = sorted({p for p in self.space.pool if p < side} | {at_or_above[0]})
        arch = self.checkpoint.arch if isinstance(self.checkpoint.arch, str) else "checkpoint.arch"
        raise ConfigError(
            f"space.pool: pools {', '.join(map(str, at_or_above))} are all at or above block {b}'s side "
            f"({side}x{side} as a head sees it: {arch}, store.max_spatial {self.store.max_spatial}), so each "
            f"leaves it {side}x{side} and {'dataset' if len(self.datasets) == 1 else 'datasets'} {datasets} would "
            f"run the same trial once per pool; keep one pool >= {side} (e.g. pool: "
            f"[{', '.join(map(str, keep))}]; the sides: `diffsweep blocks --max-spatial`)")


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("list[any]", "Range"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read, parse and validate a sweep YAML; raise ConfigError with one line on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec {path}: file not found; pass the path of a YAML file such as "
                          "search_spaces/quickstart.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"sweep spec {path}: YAML syntax error{where} ({getattr(e, 'problem', e)}); fix the YAML") \
            from None
    return parse_config(raw, path, overrides)


def parse_config(raw: Any, path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Validate the YAML's content (`path` names its source in errors); raise ConfigError in one line."""
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep spec {path}: expected a mapping of settings at the top level")
    raw = copy.deepcopy(raw)  # a deep copy: overrides never change the caller's dict
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = _loc(err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        raise ConfigError(f"sweep spec {path}: {where}: {msg}") from None
    cfg.check_blocks()
    return cfg
