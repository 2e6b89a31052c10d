"""Run a sweep: Ray Tune Tuner + per-dataset Optuna studies + ASHA, tracked in MLflow, then select/export."""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import ConfigError, SweepConfig
from trials.features import BackboneSpec, DatasetSpec, numeric_path
from trials.requests import with_block_table

log = logging.getLogger("diffsweep")
STATE_FILE = "diffsweep_sweep.json"


def _is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """Tune and the store need paths every worker can open: make local ones absolute."""
    return path if _is_uri(path) else str(Path(path).expanduser().resolve())


def sweep_dir(cfg: SweepConfig) -> Path:
    return Path(absolute(cfg.storage_path)) / cfg.name


def model_spec(cfg: SweepConfig, arch: str | dict, path: Path | None, what: str) -> BackboneSpec:
    """A U-Net's identity in every feature key: its architecture and weights file (by content), or, with
    no file, the same U-Net with random weights seeded by the sweep. `what` names the setting in errors."""
    from trials.ddpm import sha256_file

    arch_key = arch if isinstance(arch, str) else tuple(sorted(arch.items()))
    if path is None:
        spec = BackboneSpec(arch_key, None, f"random:{cfg.seed}", cfg.checkpoint.schedule, cfg.checkpoint.class_label)
    elif not path.is_file():
        raise ConfigError(f"{what}: {path} not found; pass the path of a .pt or .safetensors file "
                          "(or leave it empty for the shipped model)")
    else:
        spec = BackboneSpec(arch_key, str(path), sha256_file(path), cfg.checkpoint.schedule,
                            cfg.checkpoint.class_label)
    return with_block_table(spec)  # so the sweep's feature coordinator plans without torch


def backbone_spec(cfg: SweepConfig) -> BackboneSpec:
    """The sweep's own U-Net."""
    return model_spec(cfg, cfg.checkpoint.arch, cfg.checkpoint_path(), "checkpoint.path")


def dataset_specs(cfg: SweepConfig) -> dict[str, DatasetSpec]:
    return {d.name: DatasetSpec(d.name, d.root, d.val_fraction, tuple(sorted(d.limit.items())), d.skip_corrupt,
                                tuple(sorted(d.options.items())), cfg.seed) for d in cfg.datasets}


def space_blocks(cfg: SweepConfig) -> dict[int, tuple[int, ...]]:
    """t -> every block the space may read at t, so one U-Net pass per t captures them all."""
    out: dict[int, set[int]] = {t: set(cfg.space.block) for t in cfg.space.t}
    for maps in (m for sets in cfg.space.listed_map_sets().values() for m in sets):
        for t, b in maps:
            out.setdefault(int(t), set()).add(int(b))
    return {t: tuple(sorted(b)) for t, b in out.items()}


def check_datasets(cfg: SweepConfig) -> None:
    """Open every dataset now (cheap: annotation files only) so a bad root fails before Ray starts."""
    from trials.features import dataset_splits
    for spec in dataset_specs(cfg).values():
        dataset_splits(spec)


def check_writable(cfg: SweepConfig) -> None:
    """Every local output folder must be writable before any compute (URIs are checked by their fs)."""
    for key, path in (("export_dir", cfg.export_dir), ("storage_path", cfg.storage_path), ("store.path", cfg.store.path)):
        if _is_uri(path):
            continue
        folder = Path(path).expanduser()
        existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: {folder} is not writable (nearest existing folder: {existing}); "
                              "choose a folder you can write to")


def known_local_cluster() -> tuple[str, Path] | None:
    """The address `ray start` left for a bare `ray.init()` to join, and the file that holds it."""
    # where Ray itself looks (ray._common.utils.get_ray_address_file), without importing its internals
    tmp = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    path = Path(tmp or "/tmp") / "ray" / "ray_current_cluster"
    try:
        address = path.read_text().strip()
    except OSError:
        return None
    return (address, path) if address else None


def answers(address: str, timeout: float = 2.0) -> bool:
    """Whether anything listens at host:port (a killed head leaves its address behind; nothing answers)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


TUNE_SNAPSHOT_LOGGER = "ray.tune.execution.experiment_state"


class SnapshotErrorsInOneLine(logging.Filter):
    """Tune logs a failed upload of its experiment snapshot with the whole traceback and carries on.
    On a local storage path it happens when its searcher renames a temp file while the copy lists the
    folder (seen once in the test suite, the sweep unharmed); the next snapshot uploads again, and the
    last one is awaited. One line, with the error, says so instead of a traceback from inside Ray."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            first = (str(error).splitlines() or [""])[0][:300]
            record.msg = (f"{record.getMessage().rstrip(': ')}: {type(error).__name__}: {first} "
                          "(the next snapshot uploads it again)")
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


def quiet_snapshot_errors() -> None:
    logger = logging.getLogger(TUNE_SNAPSHOT_LOGGER)
    if not any(isinstance(f, SnapshotErrorsInOneLine) for f in logger.filters):
        logger.addFilter(SnapshotErrorsInOneLine())


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Tune snapshots the experiment after every trial checkpoint (that is what makes `resume` lose
    # nothing); on a small sweep it warns that this is frequent. It is intended here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=False)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None and join_known_local_cluster(kwargs):
        return
    if address and address != "local":
        ray.init(address=address, **kwargs)
    else:  # a laptop or a CI box: small and quiet, no dashboard
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 object_store_memory=256 * 1024 ** 2, **kwargs)


def join_known_local_cluster(kwargs: dict[str, Any]) -> bool:
    """Ray's convention for a bare ray.init(): join the cluster `ray start` made on this machine (sizing
    a new instance then is an error). A stale address (a head killed without `ray stop`) names nothing:
    say so and let the caller start a fresh local instance. One line either way."""
    import ray

    known = known_local_cluster()
    if known is None:
        return False
    address, path = known
    if answers(address):
        try:
            ray.init(address=address, **kwargs)
            print(f"ray: joined the local cluster at {address} (started by `ray start`, listed in {path}); "
                  "pass --address local for a private instance", flush=True)
            return True
        except ConnectionError:
            pass
    print(f"ray: no Ray cluster answers at {address} (stale {path}: a head stopped without `ray stop`); "
          "starting a local instance", flush=True)
    return False


def sweep_numeric(cfg: SweepConfig) -> str:
    """The numeric path of the sweep's features (part of their keys), unless `store.numeric` names
    one: bf16 on CUDA when extraction runs on GPUs; on CPUs, bf16 where the driver's CPU has bf16
    units, else fp32 (`trials.features.numeric_path`)."""
    if cfg.store.numeric != "auto":
        return cfg.store.numeric
    return numeric_path("cuda" if cfg.resources.extract_gpu > 0 else "cpu")


def space_pools(cfg: SweepConfig) -> tuple[int, ...]:
    return tuple(sorted(set(cfg.space.pool)))


def trial_setup(cfg: SweepConfig):
    from trials.features import FillOptions
    from trials.train_head import Recipe
    from trials.trainable import TrialSetup

    return TrialSetup(
        sweep=cfg.name, backbone=backbone_spec(cfg), datasets=dataset_specs(cfg),
        fill=FillOptions(absolute(cfg.store.path), int(cfg.store.part_bytes), cfg.store.batch_size,
                         cfg.store.compile),
        noise_seed=cfg.noise_seed, space_blocks=space_blocks(cfg),
        recipe=Recipe(cfg.training.recipe, cfg.epochs, cfg.training.batch_size), max_spatial=cfg.store.max_spatial,
        numeric=sweep_numeric(cfg), space_pools=space_pools(cfg), seed=cfg.seed,
        space_draws=tuple(sorted(set(cfg.space.noise_draws))),
        extract_options={"num_cpus": max(cfg.resources.extract_cpu, 1), "num_gpus": cfg.resources.extract_gpu})


def sweep_coordinator(cfg: SweepConfig, setup):
    """The sweep's feature coordinator. Ray ends an actor when its creator's last handle goes, so the
    driver holds this handle for the whole sweep; trials find the actor by name."""
    from trials.coordinator import get_coordinator

    return get_coordinator(cfg.name, setup.extract_options)


def fill_store(cfg: SweepConfig, setup, splits: tuple[str, ...] = ("train", "val"), progress: bool = True,
               coordinator=None) -> dict:
    """Extract every (dataset, split, t, noise draws) group the space needs, in parallel, each exactly once.

    Every part task declares its memory to Ray, so a node runs only as many as fit."""
    import ray
    from tqdm import tqdm

    coordinator = coordinator or sweep_coordinator(cfg, setup)
    requests = {(d, s, t, k): setup.request(d, s, t, draws=k) for d in setup.datasets for s in splits
                for t in setup.space_blocks for k in setup.space_draws}
    refs = {k: coordinator.fill.remote(r, setup.fill) for k, r in requests.items()}
    sizes = {k: len(r.samples()) for k, r in requests.items()}
    pending = {r: k for k, r in refs.items()}
    written: dict = {}
    # progress in images extracted (a group counts when its parts are stored; cached groups count at once)
    with tqdm(total=sum(sizes.values()), unit="img", desc="features", disable=not progress) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(done[0])
            written[key] = ray.get(done[0])
            bar.update(sizes[key])
    if progress:
        n = sum(len(v) for v in written.values())
        print(f"feature store: {n} new key(s) written, {len(refs)} group(s) checked at {setup.store_root}")
    return written


def announce_store_pooling(setup) -> None:
    """Say once, at the start, which blocks the store keeps at less than their native resolution."""
    shapes = setup.request(next(iter(setup.datasets)), "train", next(iter(setup.space_blocks))).shapes()
    pooled = [f"{b} ({s.native}x{s.native} -> {s.side}x{s.side})" for b, s in sorted(shapes.items()) if s.side < s.native]
    if pooled:
        print(f"note: store.max_spatial={setup.max_spatial} pools block(s) {', '.join(pooled)}: heads see the "
              "pooled map", flush=True)


@dataclass
class SweepOutcome:
    results: Any  # pandas DataFrame, one row per trial
    selected: dict[str, dict]
    parent_run_id: str
    export_dir: Path
    tracking_gaps: int
    # selections below `selection.min_val_acc`: {dataset: head, t, block, pool, members, val_acc,
    # min_val_acc}, neither tested nor exported
    below_bar: dict[str, dict] = field(default_factory=dict)


def tune_restored_states() -> tuple[str, ...]:
    """Glob patterns of the pickled states Tune restores on resume besides the experiment state: the
    searcher's, its wrappers' and the callbacks'."""
    from ray.tune.callback import CallbackList
    from ray.tune.search import SearchGenerator, Searcher

    return tuple(t.format("*") for t in (Searcher.CKPT_FILE_TMPL, SearchGenerator.CKPT_FILE_TMPL,
                                         CallbackList.CKPT_FILE_TMPL))


def check_resumable(experiment_dir: Path) -> None:
    """`resume` restores these states from the newest of each Tune saved beside the experiment (the
    greatest name, as Tune picks them). A driver stopped while Tune copied one into storage leaves it
    short; Tune then logs the error, restarts the experiment half restored, and the resumed driver
    hangs (seen once in a clean-clone CI run: a 0-byte searcher state, the driver still running at the
    test's 600 s timeout). Refuse that in one line, before Ray starts."""
    for pattern in tune_restored_states():
        newest = max(experiment_dir.glob(pattern), default=None)
        if newest is None:
            continue
        try:
            with open(newest, "rb") as f:
                pickle.load(f)  # Tune writes these with cloudpickle, which plain pickle reads
        except Exception as e:  # truncated (EOFError, UnpicklingError) or not Tune's at all
            raise ConfigError(
                f"sweep '{experiment_dir.name}': its saved Tune state {newest} cannot be read "
                f"({type(e).__name__}; a driver stopped while Tune saved it leaves it short), so `resume` cannot "
                "continue this sweep; run it again with `diffsweep run SPACE.yaml --overwrite` (or `--name "
                "NEW`): stored features are reused") from None


def run_sweep(cfg: SweepConfig, address: str | None = None, resume: bool = False,
              tracking_fallback: bool = False, register_model: str | None = None) -> SweepOutcome:
    """`register_model`: also register each winner's MLflow model under this name (NAME for one
    dataset, NAME-<dataset> for several)."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from orchestrator.checkpoints import CheckpointThinning
    from orchestrator.schedule import PerDatasetASHA
    from orchestrator.search import PerDatasetOptunaSearch
    from orchestrator.report import print_trial_errors
    from orchestrator.select import select_and_export
    from orchestrator.tracking import MlflowTrialCallback, SweepRun, check_reachable, restoring_into
    from trials.trainable import train_trial

    check_reachable(cfg.tracking.uri)
    check_writable(cfg)
    check_datasets(cfg)
    setup = trial_setup(cfg)
    sdir = sweep_dir(cfg)
    state_path = sdir / STATE_FILE
    state = json.loads(state_path.read_text()) if resume and state_path.exists() else {}

    from orchestrator.plan import check_space, format_plan, sweep_plan
    plan = sweep_plan(cfg, setup)
    print(format_plan(plan), flush=True)
    check_space(plan)
    init_ray(address)
    quiet_snapshot_errors()
    announce_store_pooling(setup)
    coordinator = sweep_coordinator(cfg, setup)  # held until the sweep returns (see sweep_coordinator)
    fill_store(cfg, setup, coordinator=coordinator)
    parent = SweepRun(cfg.tracking.uri, cfg.experiment, cfg.name, state.get("parent_run_id"))
    if not resume:
        parent.log_params({"space": json.dumps(cfg.space.model_dump()), "sampler": cfg.search.sampler,
                           "num_samples": cfg.search.num_samples, "checkpoint": setup.backbone.checkpoint,
                           "checkpoint_sha256": setup.backbone.sha256, "arch": str(cfg.checkpoint.arch),
                           "datasets": ",".join(setup.datasets), "seed": cfg.seed})
        parent.log_dataset_inputs(setup.datasets)
    sdir.mkdir(parents=True, exist_ok=True)
    state = {"parent_run_id": parent.run_id, "config": cfg.model_dump(mode="json")}
    state_path.write_text(json.dumps(state, indent=1))

    def announce(status: str, info: dict) -> None:
        print(f"  trial {status:9s} {info.get('dataset')}: head={info.get('head')} t={info.get('t')} "
              f"block={info.get('block')} pool={info.get('pool', '-')} val_acc={info.get('val_acc') or 0:.4f} "
              f"epochs={info.get('epoch')}", flush=True)

    callback = MlflowTrialCallback(cfg.tracking.uri, parent.experiment_id, parent.run_id, cfg.epochs, announce)
    searcher = PerDatasetOptunaSearch(cfg)
    a = cfg.search.asha
    scheduler = (PerDatasetASHA([d.name for d in cfg.datasets], max_t=a.max_t, grace_period=a.grace_period,
                                reduction_factor=a.reduction_factor) if a else FIFOScheduler())
    trainable = tune.with_resources(tune.with_parameters(train_trial, setup=setup),
                                    {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    run_config = tune.RunConfig(
        name=cfg.name, storage_path=absolute(cfg.storage_path), verbose=0,
        callbacks=[callback, CheckpointThinning(keep=cfg.training.checkpoints_to_keep)],
        failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
        # Tune keeps every checkpoint folder (a restore may name any of them); CheckpointThinning drops the
        # weights of all but the newest `checkpoints_to_keep`
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None))
    # reuse_actors: the next trial runs in the worker process the last one left (its torch import,
    # CUDA context and compiled extractor kept); each trial still builds its own head and data
    tune_config = tune.TuneConfig(metric=cfg.search.metric, mode="max", scheduler=scheduler,
                                  search_alg=ConcurrencyLimiter(searcher, cfg.search.max_concurrent),
                                  num_samples=searcher.total_budget, reuse_actors=True)
    if resume:
        with restoring_into(callback):  # the first run's pickled callback comes back as this one
            tuner = tune.Tuner.restore(str(sdir), trainable, resume_unfinished=True, resume_errored=True,
                                       param_space=None)
    else:
        tuner = tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)
    print(f"sweep '{cfg.name}': up to {searcher.total_budget} trials over {len(setup.datasets)} dataset(s), "
          f"MLflow {cfg.tracking.uri} (experiment '{cfg.experiment}')", flush=True)
    grid = tuner.fit()
    outcome = select_and_export(cfg, setup, grid, parent, callback, register_model=register_model)
    print_trial_errors(outcome.results)
    parent.finish("FINISHED")
    del coordinator  # the sweep's features are all made: the actor may go
    return outcome
