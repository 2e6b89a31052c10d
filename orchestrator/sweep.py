"""Run a sweep: Ray Tune Tuner + per-dataset Optuna studies + ASHA, tracked in MLflow, then select/export."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import ConfigError, SweepConfig
from trials.features import BackboneSpec, DatasetSpec

log = logging.getLogger("diffsweep")
STATE_FILE = "diffsweep_sweep.json"


def _is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """Tune and the store need paths every worker can open: make local ones absolute."""
    return path if _is_uri(path) else str(Path(path).expanduser().resolve())


def sweep_dir(cfg: SweepConfig) -> Path:
    return Path(absolute(cfg.storage_path)) / cfg.name


def backbone_spec(cfg: SweepConfig) -> BackboneSpec:
    from trials.ddpm import sha256_file

    arch = cfg.checkpoint.arch
    arch_key = arch if isinstance(arch, str) else tuple(sorted(arch.items()))
    path = cfg.checkpoint_path()
    if path is None:
        return BackboneSpec(arch_key, None, f"random:{cfg.seed}", cfg.checkpoint.schedule)
    if not path.is_file():
        raise ConfigError(f"checkpoint.path: {path} not found; pass the path of a .pt or .safetensors file "
                          "(or leave it empty for the shipped model)")
    return BackboneSpec(arch_key, str(path), sha256_file(path), cfg.checkpoint.schedule)


def dataset_specs(cfg: SweepConfig) -> dict[str, DatasetSpec]:
    return {d.name: DatasetSpec(d.name, d.root, d.val_fraction, tuple(sorted(d.limit.items())), d.skip_corrupt,
                                tuple(sorted(d.options.items())), cfg.seed) for d in cfg.datasets}


def space_blocks(cfg: SweepConfig) -> dict[int, tuple[int, ...]]:
    """t -> every block the space may read at t, so one U-Net pass per t captures them all."""
    out: dict[int, set[int]] = {t: set(cfg.space.block) for t in cfg.space.t}
    for maps in cfg.space.fusion_maps:
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
    for field, path in (("export_dir", cfg.export_dir), ("storage_path", cfg.storage_path), ("store.path", cfg.store.path)):
        if _is_uri(path):
            continue
        folder = Path(path).expanduser()
        existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{field}: {folder} is not writable (nearest existing folder: {existing}); "
                              "choose a folder you can write to")


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Tune snapshots the experiment after every trial checkpoint (that is what makes `resume` lose
    # nothing); on a small sweep it warns that this is frequent. It is intended here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=False)
    if address:
        ray.init(address=address, **kwargs)
    else:  # a laptop or a CI box: small and quiet, no dashboard
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 object_store_memory=256 * 1024 ** 2, **kwargs)


def trial_setup(cfg: SweepConfig):
    from trials.train_head import Recipe
    from trials.trainable import TrialSetup

    return TrialSetup(
        sweep=cfg.name, backbone=backbone_spec(cfg), datasets=dataset_specs(cfg), store_root=absolute(cfg.store.path),
        noise_seed=cfg.noise_seed, space_blocks=space_blocks(cfg),
        recipe=Recipe(cfg.training.recipe, cfg.epochs, cfg.training.batch_size), max_spatial=cfg.store.max_spatial,
        seed=cfg.seed, extract_options={"num_cpus": cfg.resources.extract_cpu, "num_gpus": cfg.resources.extract_gpu})


def fill_store(cfg: SweepConfig, setup, splits: tuple[str, ...] = ("train", "val"), progress: bool = True) -> dict:
    """Extract every (dataset, split, t) group the space needs, in parallel, each exactly once."""
    import ray
    from trials.coordinator import get_coordinator

    coordinator = get_coordinator(cfg.name, setup.store_root, {"num_cpus": max(cfg.resources.extract_cpu, 1),
                                                                "num_gpus": cfg.resources.extract_gpu})
    refs = {(d, s, t): coordinator.ensure.remote(setup.backbone, spec, s, t, blocks, setup.noise_seed,
                                                   setup.max_spatial, False, cfg.store.shard_size,
                                                   cfg.store.batch_size)
            for d, spec in setup.datasets.items() for s in splits for t, blocks in setup.space_blocks.items()}
    from tqdm import tqdm

    from trials.features import dataset_splits

    sizes = {k: len(dataset_splits(setup.datasets[k[0]])[1][k[1]]) for k in refs}
    pending = {r: k for k, r in refs.items()}
    written: dict = {}
    # progress in images extracted (a group counts when its shards are stored; cached groups count at once)
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


@dataclass
class SweepOutcome:
    results: Any  # pandas DataFrame, one row per trial
    selected: dict[str, dict]
    parent_run_id: str
    export_dir: Path
    tracking_gaps: int


def run_sweep(cfg: SweepConfig, address: str | None = None, resume: bool = False,
              tracking_fallback: bool = False) -> SweepOutcome:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from orchestrator.search import PerDatasetOptunaSearch
    from orchestrator.select import select_and_export
    from orchestrator.tracking import MlflowTrialCallback, SweepRun, check_reachable
    from trials.trainable import train_trial

    check_reachable(cfg.tracking.uri)
    check_writable(cfg)
    check_datasets(cfg)
    setup = trial_setup(cfg)
    sdir = sweep_dir(cfg)
    state_path = sdir / STATE_FILE
    state = json.loads(state_path.read_text()) if resume and state_path.exists() else {}

    init_ray(address)
    fill_store(cfg, setup)
    parent = SweepRun(cfg.tracking.uri, cfg.experiment, cfg.name, state.get("parent_run_id"))
    if not resume:
        parent.log_params({"space": json.dumps(cfg.space.model_dump()), "sampler": cfg.search.sampler,
                           "num_samples": cfg.search.num_samples, "checkpoint": setup.backbone.checkpoint,
                           "checkpoint_sha256": setup.backbone.sha256, "arch": str(cfg.checkpoint.arch),
                           "datasets": ",".join(setup.datasets), "seed": cfg.seed})
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
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=a.max_t, grace_period=a.grace_period,
                               reduction_factor=a.reduction_factor) if a else FIFOScheduler())
    trainable = tune.with_resources(tune.with_parameters(train_trial, setup=setup),
                                    {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    run_config = tune.RunConfig(
        name=cfg.name, storage_path=absolute(cfg.storage_path), callbacks=[callback], verbose=0,
        failure_config=tune.FailureConfig(max_failures=3),
        checkpoint_config=tune.CheckpointConfig())
    tune_config = tune.TuneConfig(metric=cfg.search.metric, mode="max", scheduler=scheduler,
                                  search_alg=ConcurrencyLimiter(searcher, cfg.search.max_concurrent),
                                  num_samples=searcher.total_budget)
    if resume:
        tuner = tune.Tuner.restore(str(sdir), trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=None)
    else:
        tuner = tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)
    print(f"sweep '{cfg.name}': up to {searcher.total_budget} trials over {len(setup.datasets)} dataset(s), "
          f"MLflow {cfg.tracking.uri} (experiment '{cfg.experiment}')", flush=True)
    grid = tuner.fit()
    outcome = select_and_export(cfg, setup, grid, parent, callback)
    parent.finish("FINISHED")
    return outcome
