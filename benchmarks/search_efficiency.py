"""Does diffsweep's TPE + ASHA find the grid's best, for what share of its head-epochs, judged elsewhere?

Datasets: Fashion-MNIST through the shipped DDPM (adm-28-small, `--checkpoint` for another file), the
dataset the figures are reported on, and sklearn's digits through the same U-Net with random weights,
the cheap dataset diffsweep's search defaults (trials, ASHA rungs, TPE options) were chosen on. Each
dataset's feature store is filled once; every (t, block, pool) map is pooled once (the sweep's pooled
caches) and held in memory (benchmarks/search_data.py).

Splits: searches choose on the sweep's val split (Fashion-MNIST: 3,000 images); the chosen
configuration is scored on a judge split carved (seeded, stratified) from the sweep's train split,
which no search sees; heads train on the rest of train. The official test split is not read.

Space: 5 t x 5 blocks x 3 pools x 3 heads (linear; mlp with hidden 128 or 512) = 225 categorical
points, plus each head's learning rate, a continuous log range. Every trial trains for real
(benchmarks/search_sim.py: HeadTrainer, the sweep's AdamW + cosine recipe and seed, max_t epochs).

Methods, all with the sweep's own searcher orchestrator.search.PerDatasetOptunaSearch (real Optuna
studies, its sampler config) behind Tune's ConcurrencyLimiter (2 concurrent), with Ray Tune's own
ASHAScheduler or FIFOScheduler driven in-process the way Tune's controller drives them:

- grid: every point at the learning rate's geometric midpoint, max_t epochs each (the reference);
- tpe+asha: diffsweep's sweep (sampler tpe, diffsweep's default num_samples and ASHA); the head-epochs
  it spends, E, are the budget of the other methods on that seed;
- random, random+asha, tpe (no ASHA): sampler random / tpe, as many trials as fit in E head-epochs.

Per method and seed: the judge accuracy of the configuration chosen on val (as orchestrator.select
chooses) after every head-epoch spent (the anytime curve, `--plot`), and at the end. The gap is the
grid's chosen configuration's judge accuracy minus the method's, in points. A configuration's curve
is cached by its exact value, so identical configs (the same random draw with and without ASHA)
train once; no other reuse.

    .venv/bin/python benchmarks/search_efficiency.py --quick                  # digits subset, 48 points, 3 seeds, < 60 s
    .venv/bin/python benchmarks/search_efficiency.py --seeds 0..9 --plot benchmarks/search_efficiency.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import common  # noqa: F401  (puts the checkout on sys.path)
import search_data
import search_sim
from orchestrator.config import Asha, Search

TS, BLOCKS, POOLS = [10, 50, 100, 200, 400], [4, 6, 8, 9, 10], [1, 2, 4]
HEADS = {"linear": {"lr": {"low": 1e-4, "high": 3e-2, "log": True}},
         "mlp": {"hidden": [128, 512], "lr": {"low": 1e-4, "high": 1e-2, "log": True}}}
QUICK = {"ts": [10, 100], "blocks": [4, 6, 8, 10], "pools": [2, 4]}  # 48 points, digits subset
METHODS = ("tpe+asha", "tpe", "random+asha", "random")
DATASETS = {  # name -> (random weights, train limit, val limit, val fraction, judge fraction of train)
    "digits": (True, None, None, 0.3, 0.3),
    "fashion_mnist": (False, 9000, 3000, 0.1, 1 / 3),
}
QUICK_DIGITS = (True, 600, 300, 0.3, 0.3)


def parse_seeds(text: str) -> list[int]:
    try:
        if ".." in text:
            a, b = text.split("..")
            seeds = list(range(int(a), int(b) + 1))
        else:
            seeds = list(range(int(text)))
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"{text!r}: give A..B (inclusive, A <= B) or a count N; e.g. --seeds 10..19")
    return seeds


def sweep_config(args, dataset: str, space: dict, sampler: str, seed: int, num_samples: int):
    from orchestrator.config import SweepConfig

    return SweepConfig.model_validate({
        "name": f"search-eff-{dataset}-{sampler}-{seed}", "datasets": [{"name": dataset}], "space": space,
        "search": {"sampler": sampler, "seed": seed, "num_samples": num_samples,
                   "max_concurrent": args.max_concurrent,
                   "asha": {"max_t": args.max_t, "grace_period": args.grace_period,
                            "reduction_factor": args.reduction_factor}},
        "training": {"recipe": "adamw", "batch_size": 128},
    })


def describe(config: dict | None) -> str:
    if not config:
        return "-"
    return " ".join(f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items()
                    if k not in ("dataset",) and not k.startswith("_"))


def evaluate(args, dataset: str, store: str, seeds: list[int], quick: bool) -> dict:
    from orchestrator.config import Space
    from orchestrator.search import grid_points

    random_weights, train_limit, val_limit, val_fraction, judge_fraction = \
        QUICK_DIGITS if quick and dataset == "digits" else DATASETS[dataset]
    ts, blocks, pools = (QUICK["ts"], QUICK["blocks"], QUICK["pools"]) if quick else (TS, BLOCKS, POOLS)
    space = {"t": ts, "block": blocks, "pool": pools, "head": HEADS}
    data = search_data.load(dataset, random_weights=random_weights, checkpoint=args.checkpoint, ts=ts, blocks=blocks,
                            pools=pools, store_root=store, train_limit=train_limit, val_limit=val_limit,
                            val_fraction=val_fraction, judge_fraction=judge_fraction)
    points = grid_points(Space.model_validate(space))
    print(f"{dataset} ({'random weights' if random_weights else 'shipped DDPM'}): train {data.sizes['train']} / "
          f"val {data.sizes['val']} / judge {data.sizes['judge']} images; store filled once ({data.passes} image "
          f"passes) and pooled in {data.seconds:.0f}s; {len(points)}-point grid x {args.max_t} epochs", flush=True)
    trials = search_sim.Trials(data, args.max_t)
    cache = None
    if args.cache:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
        tag = f"{dataset}-{'-'.join(map(str, ts))}-{'-'.join(map(str, blocks))}-{'-'.join(map(str, pools))}"
        cache = str(Path(args.cache) / f"{tag}-max_t{args.max_t}-{data.sizes['train']}.pkl")
        print(f"  curves cached earlier: {trials.load(cache)} ({cache})", flush=True)
    t0 = time.perf_counter()
    grid = search_sim.run_grid(points, trials, dataset)
    again = trials.train_curve(grid.best, args.max_t)
    key = search_sim.config_key({k: v for k, v in grid.best.items() if not k.startswith("_")})
    assert again == list(zip(trials.curves[key].val, trials.curves[key].judge)), \
        "head training is not deterministic: cached curves would be invalid"
    oracle = max(trials.curves[search_sim.config_key({"dataset": dataset, **p})].judge[-1] for p in points)
    print(f"  grid: chosen {describe(grid.best)}: val {grid.best_val:.4f}, judge {grid.best_judge:.4f} "
          f"(best judge of any grid point {oracle:.4f}); {grid.epochs} head-epochs, {time.perf_counter() - t0:.0f}s; "
          f"retraining the chosen point gave the identical curve", flush=True)
    if cache:
        trials.save(cache)
    runs = {m: [] for m in METHODS}
    for seed in seeds:
        t0 = time.perf_counter()
        ours = search_sim.run_search(sweep_config(args, dataset, space, "tpe", seed, args.num_samples), trials, True)
        budget = ours.epochs
        out = {"tpe+asha": ours}
        for method in METHODS[1:]:
            sampler, asha = method.split("+")[0], method.endswith("+asha")
            out[method] = search_sim.run_search(sweep_config(args, dataset, space, sampler, seed, 10 ** 6), trials, asha,
                                                budget=budget)
        for m in METHODS:
            runs[m].append(out[m])
        print(f"  seed {seed}: budget {budget} head-epochs ({budget / grid.epochs:.3f} of the grid's); gap (pts) " +
              ", ".join(f"{m} {100 * (grid.best_judge - out[m].best_judge):.2f} ({out[m].completed}/{out[m].trials})"
                        for m in METHODS) + f"; chosen {describe(ours.best)} [{time.perf_counter() - t0:.0f}s]",
              flush=True)
    if cache:
        trials.save(cache)
    return {"dataset": dataset, "sizes": data.sizes, "points": len(points), "grid": grid, "oracle": oracle,
            "runs": runs, "seeds": seeds, "trained_epochs": trials.trained_epochs}


def summary(result: dict) -> dict:
    grid, runs = result["grid"], result["runs"]
    gaps = {m: [100 * (grid.best_judge - o.best_judge) for o in runs[m]] for m in METHODS}
    ours = runs["tpe+asha"]
    fractions = [o.epochs / grid.epochs for o in ours]
    beats = [a.best_judge > b.best_judge for a, b in zip(ours, runs["random"])]
    ties = [a.best_judge == b.best_judge for a, b in zip(ours, runs["random"])]
    s = {"gap": statistics.median(gaps["tpe+asha"]), "epochs_fraction": statistics.median(fractions),
         "beats_random": sum(beats) / len(beats), "ties_random": sum(ties) / len(ties),
         "median_gap": {m: statistics.median(g) for m, g in gaps.items()},
         "median_judge": {m: statistics.median(o.best_judge for o in runs[m]) for m in METHODS},
         "within_0.3": sum(g <= 0.3 for g in gaps["tpe+asha"]), "seeds": len(ours)}
    s["met"] = (s["gap"] <= 0.3 and s["epochs_fraction"] <= 0.25 and s["beats_random"] >= 0.7
                and s["median_judge"]["tpe+asha"] >= s["median_judge"]["random+asha"])
    return s


def report(result: dict, s: dict) -> None:
    grid = result["grid"]
    print(f"{result['dataset']}, medians over {s['seeds']} seeds (grid chosen: judge {grid.best_judge:.4f}, "
          f"{grid.epochs} head-epochs; every method at tpe+asha's budget, median fraction "
          f"{s['epochs_fraction']:.3f}):")
    print(f"  {'method':<12} {'judge':>7} {'gap pts':>8}")
    print(f"  {'grid':<12} {grid.best_judge:>7.4f} {0:>8.2f}")
    for m in METHODS:
        print(f"  {m:<12} {s['median_judge'][m]:>7.4f} {s['median_gap'][m]:>8.2f}")
    print(f"  tpe+asha within 0.3 pts in {s['within_0.3']}/{s['seeds']} seeds; beats random in "
          f"{s['beats_random']:.0%} of seeds (ties {s['ties_random']:.0%}); targets (gap <= 0.3, fraction <= 0.25, "
          f"beats random >= 70 %, median >= random+asha): {'met' if s['met'] else 'NOT met'}")


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.4), squeeze=False)
    for ax, result in zip(axes[0], results):
        grid = result["grid"]
        for m in ("random", "random+asha", "tpe", "tpe+asha"):
            traces = [o.trace for o in result["runs"][m]]
            n = max(len(t) for t in traces)
            padded = np.array([np.concatenate([t, np.full(n - len(t), t[-1] if len(t) else np.nan)]) for t in traces])
            x = np.arange(1, n + 1)
            with np.errstate(all="ignore"), __import__("warnings").catch_warnings():
                __import__("warnings").simplefilter("ignore")
                med = np.nanmedian(padded, 0)
                lo, hi = np.nanpercentile(padded, 25, 0), np.nanpercentile(padded, 75, 0)
            (line,) = ax.plot(x, 100 * med, label=m, lw=2 if m == "tpe+asha" else 1.2)
            ax.fill_between(x, 100 * lo, 100 * hi, color=line.get_color(), alpha=0.15)
        ax.axhline(100 * grid.best_judge, color="k", ls="--", lw=1,
                   label=f"grid ({grid.epochs} head-epochs)")
        ax.axhspan(100 * grid.best_judge - 0.3, 100 * grid.best_judge, color="k", alpha=0.06)
        ax.set_xlabel("head-epochs spent")
        ax.set_ylabel("judge accuracy of the chosen config (%)")
        ax.set_title(f"{result['dataset']}: {result['points']}-point space + lr, "
                     f"{len(result['seeds'])} seeds (median, IQR)", fontsize=10)
        finite = [100 * v for m in METHODS for o in result["runs"][m] for v in o.trace if np.isfinite(v)]
        ax.set_ylim(max(min(finite), 100 * grid.best_judge - 6), 100 * max(max(finite) / 100, grid.best_judge) + 0.5)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits only (900-image subset), 48-point space, 16 trials, seeds 0..2 (< 60 s)")
    ap.add_argument("--datasets", default=None, help="comma list of digits,fashion_mnist (default both; quick digits)")
    ap.add_argument("--seeds", type=parse_seeds, default=None, help="A..B inclusive, or a count N (default 0..9; quick 0..2)")
    ap.add_argument("--num-samples", type=int, default=None,
                    help=f"tpe+asha trials (diffsweep's default, {Search().num_samples}; quick 16: its space is 48 points)")
    ap.add_argument("--max-t", type=int, default=Asha().max_t, help=f"epochs of a full trial (default {Asha().max_t})")
    ap.add_argument("--grace-period", type=int, default=Asha().grace_period,
                    help=f"ASHA grace period (diffsweep's default, {Asha().grace_period})")
    ap.add_argument("--reduction-factor", type=float, default=Asha().reduction_factor,
                    help=f"ASHA reduction factor (diffsweep's default, {Asha().reduction_factor:g})")
    ap.add_argument("--max-concurrent", type=int, default=Search().max_concurrent, help="concurrent trials")
    ap.add_argument("--tpe-options", default=None,
                    help="JSON overriding orchestrator.search.TPE_OPTIONS (to choose defaults on digits)")
    ap.add_argument("--checkpoint", default=None, help="adm-28-small weights for Fashion-MNIST (default: shipped)")
    ap.add_argument("--store", default=None, help="feature store to fill and reuse (default: a temp dir)")
    ap.add_argument("--cache", default=None, help="directory for the trained curves, reused by a rerun (default: none)")
    ap.add_argument("--plot", default=None, help="write the anytime curves to this PNG")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for extraction and heads")
    args = ap.parse_args()
    seeds = args.seeds or parse_seeds("0..2" if args.quick else "0..9")
    args.num_samples = args.num_samples or (16 if args.quick else Search().num_samples)
    datasets = (args.datasets or ("digits" if args.quick else "digits,fashion_mnist")).split(",")
    for d in datasets:
        if d not in DATASETS:
            ap.error(f"--datasets: unknown dataset {d!r}; use digits and/or fashion_mnist")
    if args.tpe_options:
        import orchestrator.search as search
        search.TPE_OPTIONS = {**search.TPE_OPTIONS, **json.loads(args.tpe_options)}
    common.set_threads(args.threads)
    import orchestrator.search as search
    print(f"search_efficiency: seeds {seeds[0]}..{seeds[-1]}; tpe+asha = {args.num_samples} trials, ASHA grace "
          f"{args.grace_period} reduction {args.reduction_factor:g} max_t {args.max_t}, TPE {search.TPE_OPTIONS}, "
          f"{args.max_concurrent} concurrent", flush=True)
    t_start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="search_eff_") as tmp:
        for d in datasets:
            results.append(evaluate(args, d, args.store or tmp, seeds, args.quick))
    summaries = [summary(r) for r in results]
    for r, s in zip(results, summaries):
        report(r, s)
    if args.plot:
        plot(results, args.plot)
        print(f"curves: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps([{**s, "dataset": r["dataset"], "sizes": r["sizes"],
                                                "grid_judge": r["grid"].best_judge, "grid_epochs": r["grid"].epochs,
                                                "oracle_judge": r["oracle"],
                                                "grid_chosen": describe(r["grid"].best)}
                                               for r, s in zip(results, summaries)], indent=1))
    s = summaries[-1]  # the evaluation dataset (Fashion-MNIST unless only digits ran)
    print(f"total {time.perf_counter() - t_start:.0f}s")
    print(f"gap={s['gap']:.2f} epochs_fraction={s['epochs_fraction']:.3f} beats_random={s['beats_random']:.2f}")


if __name__ == "__main__":
    main()
