"""Does TPE + ASHA find the grid's best configuration, and for what fraction of the grid's epochs?

Features of the shipped small DDPM (adm-28-small; `--checkpoint` for another file) on digits
(default) are extracted once into a feature store shared by every run. Then:

- grid: every configuration of a 48-point space (3 t x 4 blocks x 2 pools x linear head x 2 learning
  rates), each trained to max_t epochs, exactly as a trial trains (trials.trainable.load_split +
  HeadTrainer + the sweep's recipe and seed);
- search: the default diffsweep sweep, TPE (orchestrator.search.make_sampler, seeded) + ASHA
  (max_t 8, grace 1, diffsweep's default reduction factor) + 2 concurrent trials, diffsweep's default
  number of trials (`--num-samples`), for several seeds.

Per seed it prints the gap between the grid's best validation accuracy and the search's (selected as
orchestrator.select does: best final val_acc among trials that ran to max_t), in accuracy points,
and the head-training epochs the search used as a fraction of the grid's (48 x max_t).

How the search runs (default): in-process, with the sweep's own components, not a copy of them:
orchestrator.search.PerDatasetOptunaSearch (real Optuna studies, suggest_config, PRUNED/COMPLETE
bookkeeping) behind Ray Tune's ConcurrencyLimiter, and Ray Tune's ASHAScheduler, driven the way
Tune's controller drives them (scheduler.on_trial_result first; searcher.on_trial_result only if the
trial continues; on STOP, on_trial_complete for both). Running trials advance one epoch per step in
turn (equal epoch times). Every parameter of the space is categorical, so every configuration TPE can
propose is a grid point, and a trial's per-epoch val_acc is the grid's curve for that point: head
training is deterministic for a (config, seed) (checked below by retraining one point), and an
ASHA-stopped trial is a prefix of the full run (the cosine schedule spans max_t either way). So the
search costs no extra training and many seeds are cheap.

`--ray` runs the real thing instead: orchestrator.sweep.run_sweep with sampler grid (no early
stopping) and with sampler tpe per seed, each a real Ray Tune run logging to a temporary MLflow, and
reads the epochs used from the results table's `epochs` column. It takes minutes, not seconds.

    .venv/bin/python benchmarks/search_efficiency.py --quick
    .venv/bin/python benchmarks/search_efficiency.py --seeds 10
    .venv/bin/python benchmarks/search_efficiency.py --ray --seeds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import common  # noqa: F401  (puts the checkout on sys.path)
from orchestrator.config import Asha, Search  # noqa: E402  (the project's default search settings)

SPACE = {"t": [10, 100, 300], "block": [4, 6, 8, 10], "pool": [1, 2],
         "head": {"linear": {"lr": [0.0003, 0.003]}}}


def sweep_config(tmp: Path, args, checkpoint: str, sampler: str, seed: int, limit: int | None):
    from orchestrator.config import SweepConfig

    limits = {"train": limit, "val": max(50, limit // 4)} if limit else {}
    grid = sampler == "grid"
    # The grid trains every point to max_t: an ASHA whose only rung is max_t never stops a trial early.
    asha = ({"max_t": args.max_t, "grace_period": args.max_t, "reduction_factor": 2} if grid else
            {"max_t": args.max_t, "grace_period": args.grace_period, "reduction_factor": args.reduction_factor})
    name = f"search-eff-{sampler}-{seed}"
    return SweepConfig.model_validate({
        "name": name, "seed": 0,
        "checkpoint": {"path": checkpoint, "arch": "adm-28-small"},
        "datasets": [{"name": args.dataset, "val_fraction": 0.15, "limit": limits}],
        "space": SPACE,
        "search": {"sampler": sampler, "seed": seed, "num_samples": args.num_samples,
                   "max_concurrent": args.max_concurrent, "asha": asha},
        "training": {"recipe": "adamw", "batch_size": 128},
        "store": {"path": str(tmp / "features"), "batch_size": 128},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlruns.db'}"},
        "storage_path": str(tmp / "ray"), "export_dir": str(tmp / f"exported-{name}"),
    })


def point_key(config: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in config.items() if k != "dataset"))


def train_point(setup, dataset: str, point: dict) -> list[float]:
    """val_acc after each epoch, trained exactly as trials.trainable.train_trial trains (without Ray)."""
    from trials.features import dataset_splits
    from trials.train_head import HeadTrainer
    from trials.trainable import head_hparams, load_split, trial_maps

    config = {"dataset": dataset, **point}
    maps = trial_maps(config)
    train = load_split(setup, dataset, "train", maps)
    val = load_split(setup, dataset, "val", maps)
    num_classes = len(dataset_splits(setup.datasets[dataset])[0])
    trainer = HeadTrainer(point["head"], head_hparams(config), train, num_classes, setup.recipe, setup.seed)
    return [m["val_acc"] for m in trainer.epochs(val)]


def simulate_search(cfg, curves: dict) -> dict:
    """One TPE + ASHA sweep with the sweep's searcher and Tune's scheduler, on the grid's curves."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler
    from ray.tune.search import ConcurrencyLimiter, Searcher

    from orchestrator.search import PerDatasetOptunaSearch

    searcher = PerDatasetOptunaSearch(cfg)
    limiter = ConcurrencyLimiter(searcher, cfg.search.max_concurrent)
    a = cfg.search.asha
    scheduler = ASHAScheduler(time_attr="epoch", max_t=a.max_t, grace_period=a.grace_period,
                              reduction_factor=a.reduction_factor)
    scheduler.set_search_properties(cfg.search.metric, "max")
    budget, created, running, done = searcher.total_budget, 0, [], []
    while True:
        while created < budget:  # Tune asks for a new trial whenever the limiter has room
            trial_id = f"trial_{created:05d}"
            config = limiter.suggest(trial_id)
            if config is None or config == Searcher.FINISHED:
                break
            created += 1
            trial = SimpleNamespace(trial_id=trial_id)
            scheduler.on_trial_add(None, trial)
            running.append({"trial": trial, "config": config, "epoch": 0})
        if not running:
            break
        for r in list(running):  # each running trial reports one more epoch, in turn
            r["epoch"] += 1
            result = {"epoch": r["epoch"], "val_acc": curves[point_key(r["config"])][r["epoch"] - 1],
                      "training_iteration": r["epoch"], "trial_id": r["trial"].trial_id}
            r["val_acc"] = result["val_acc"]
            if scheduler.on_trial_result(None, r["trial"], result) == TrialScheduler.STOP:
                scheduler.on_trial_complete(None, r["trial"], result)
                limiter.on_trial_complete(r["trial"].trial_id, result=result)
                running.remove(r)
                done.append(r)
            else:
                limiter.on_trial_result(r["trial"].trial_id, result)
    completed = [r for r in done if r["epoch"] >= a.max_t]
    best = max(completed, key=lambda r: r["val_acc"]) if completed else None
    return {"trials": len(done), "completed": len(completed), "epochs": sum(r["epoch"] for r in done),
            "best_val": best["val_acc"] if best else float("nan"), "best_config": best and best["config"]}


def ray_sweep(cfg) -> dict:
    """The real thing: a Ray Tune sweep; epochs used from the results table."""
    from orchestrator.sweep import run_sweep

    table = run_sweep(cfg).results
    completed = table[table.status == "completed"]
    best = completed.sort_values("val_acc", ascending=False).iloc[0] if len(completed) else None
    config = None if best is None else {"t": best["t"], "block": best["block"], "pool": best["pool"],
                                        **json.loads(best["hparams"])}
    return {"trials": len(table), "completed": len(completed), "epochs": int(table["epochs"].sum()),
            "best_val": float(best["val_acc"]) if best is not None else float("nan"), "best_config": config}


def describe(config: dict | None) -> str:
    if not config:
        return "-"
    return " ".join(f"{k}={v}" for k, v in config.items() if k not in ("dataset", "head"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="600 train images, 5 seeds (<~60 s)")
    ap.add_argument("--dataset", default="digits", help="digits (default) or fashion_mnist (then use --limit)")
    ap.add_argument("--limit", type=int, default=None, help="train images (val: limit/4); quick default 600")
    ap.add_argument("--seeds", type=int, default=None, help="search seeds (default 10; quick 5; --ray 3)")
    ap.add_argument("--num-samples", type=int, default=Search().num_samples,
                    help=f"trials per search (diffsweep's default, {Search().num_samples})")
    ap.add_argument("--max-t", type=int, default=8, help="epochs of a full trial (ASHA max_t; default 8)")
    ap.add_argument("--grace-period", type=int, default=1, help="ASHA grace period (default 1)")
    ap.add_argument("--reduction-factor", type=float, default=Asha().reduction_factor,
                    help=f"ASHA reduction factor (diffsweep's default, {Asha().reduction_factor:g})")
    ap.add_argument("--max-concurrent", type=int, default=2, help="concurrent trials (default 2)")
    ap.add_argument("--checkpoint", default=None, help="U-Net weights for adm-28-small (default: the shipped one)")
    ap.add_argument("--ray", action="store_true", help="real Ray Tune sweeps via run_sweep (minutes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for extraction and heads")
    args = ap.parse_args()
    seeds = args.seeds or (5 if args.quick else 3 if args.ray else 10)
    limit = args.limit if args.limit is not None else (600 if args.quick else None)
    common.set_threads(args.threads)

    from orchestrator.search import grid_points
    from orchestrator.sweep import trial_setup

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="search_eff_") as tmp_name:
        tmp = Path(tmp_name)
        # a private copy: the shipped file may be rewritten (train-ddpm) while this runs
        checkpoint = str(tmp / "backbone.safetensors")
        shutil.copy(args.checkpoint or common.SHIPPED, checkpoint)
        grid_cfg = sweep_config(tmp, args, checkpoint, "grid", 0, limit)
        setup = trial_setup(grid_cfg)
        dataset = args.dataset
        points = grid_points(grid_cfg.space)
        grid_epochs = len(points) * args.max_t
        t0 = time.perf_counter()
        passes, _ = common.fill_store(setup.backbone, setup.datasets[dataset], SPACE["t"], SPACE["block"],
                                      setup.store_root, batch_size=128)
        print(f"search_efficiency: {dataset} ({'limit ' + str(limit) if limit else 'all images'}), "
              f"{len(points)}-point grid, max_t={args.max_t}; store filled once: {passes} image passes in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)

        t0 = time.perf_counter()
        if args.ray:
            grid = ray_sweep(grid_cfg)
            grid_best = grid["best_val"]
            grid_epochs = grid["epochs"]
            grid_best_config = grid["best_config"]
        else:
            curves = {point_key(p): train_point(setup, dataset, p) for p in points}
            best_key = max(curves, key=lambda k: curves[k][-1])
            grid_best, grid_best_config = curves[best_key][-1], dict(best_key)
            again = train_point(setup, dataset, dict(best_key))
            assert again == curves[best_key], "head training is not deterministic: the in-process search is invalid"
        print(f"grid: best val_acc {grid_best:.4f} ({describe(grid_best_config)}), {grid_epochs} epochs, "
              f"{time.perf_counter() - t0:.1f}s{' (Ray Tune)' if args.ray else ''}; "
              f"{'' if args.ray else 'retraining the best point gave the identical curve'}", flush=True)

        gaps, fractions = [], []
        how = "Ray Tune run_sweep" if args.ray else "in-process: PerDatasetOptunaSearch + Tune's ConcurrencyLimiter/ASHA"
        print(f"TPE + ASHA (grace {args.grace_period}, reduction {args.reduction_factor:g}), {args.num_samples} "
              f"trials, {args.max_concurrent} concurrent, {how}:")
        for seed in range(seeds):
            cfg = sweep_config(tmp, args, checkpoint, "tpe", seed, limit)
            t0 = time.perf_counter()
            r = ray_sweep(cfg) if args.ray else simulate_search(cfg, curves)
            gap = (grid_best - r["best_val"]) * 100
            frac = r["epochs"] / grid_epochs
            gaps.append(gap)
            fractions.append(frac)
            print(f"  seed {seed}: gap {gap:5.2f} pts, epochs {r['epochs']:3d}/{grid_epochs} = {frac:.3f}, "
                  f"{r['trials']} trials ({r['completed']} to max_t), best val {r['best_val']:.4f} "
                  f"({describe(r['best_config'])}) [{time.perf_counter() - t0:.1f}s]", flush=True)
    gap, frac = statistics.median(gaps), statistics.median(fractions)
    ok = gap <= 0.5 and frac <= 0.30
    hits = sum(g <= 0.5 for g in gaps)
    print(f"median over {seeds} seeds: gap {gap:.2f} pts, epochs fraction {frac:.3f}; target gap <= 0.5 with "
          f"<= 0.30 of the grid's epochs: {'met' if ok else 'NOT met'} (median); seeds within 0.5 pts: "
          f"{hits}/{seeds}, worst gap {max(gaps):.2f} pts; total {time.perf_counter() - t_start:.0f}s")
    print(f"gap={gap:.2f} epochs_fraction={frac:.3f}")


if __name__ == "__main__":
    main()
