"""The paper's head comparison (its Figure 1, right) on our model: every head type, the shipped DDPM vs
the same U-Net with random weights, each head's (t, block, pool) chosen on validation, test once.

For each head (linear, mlp, cnn, attention, fusion, mixing) and each backbone (`ddpm`: the shipped
checkpoint; `random`: `checkpoint: {random_weights: true}`, the same adm-28-small untrained, seeded)
this runs one small sweep through the product's own path: a sweep YAML, `orchestrator.config.load_config`
and `orchestrator.sweep.run_sweep` (what `diffsweep run` runs: Ray Tune, the grid sampler of
`orchestrator.search`, ASHA, MLflow). Each sweep selects on validation (`orchestrator.select`: the best
final-epoch val_acc among trials that ran to max_t) and then reads the test split once, for its winner
only, and exports it. The table's test accuracy is that one evaluation; 12 sweeps = 12 test
evaluations, one per head x backbone. `--evaluate` also rescores every export with `diffsweep
evaluate`'s path (`orchestrator.predict.evaluate`, features recomputed from the exported files): a
second computation of the same config on the same images, a check that the export reproduces the
sweep's number, never an input to a choice.

The space of every sweep: t in {10, 25} x blocks {8, 10} (the shipped sweep's winners read t=10, blocks 8-10;
search_spaces/fashion_mnist.yaml sweeps blocks 8-10), pools {1, 2, 4} for the pooled heads (linear,
mlp); fusion chooses among three map pairs, mixing mixes all four (t, block) maps with learned weights.
Head widths are set for about 100k parameters where the head has a width (mlp hidden 96, cnn width
80, attention / fusion d=64; mixing d=512, 73k, as its 1x1 convolutions at 14x14 are the slowest
part of the comparison on a CPU); the linear probe has none (0.8k-12k by pool). AdamW +
cosine, the registry's default learning rates, grid sampler, ASHA over `--epochs` (rung at half).
All sweeps share one feature store, so each (backbone, split, t) is extracted once.

    .venv/bin/python benchmarks/head_comparison.py            # 4,000 train / 1,000 val / 10,000 test, 4 epochs
    .venv/bin/python benchmarks/head_comparison.py --quick    # 300 / 100 / 200, t=10, block 8, 1 epoch

The last line is `ddpm_beats_random=<k>/<n>`: for how many of the n heads the DDPM's test accuracy is
above the random U-Net's.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)
import yaml

HEADS = ("linear", "mlp", "cnn", "attention", "fusion", "mixing")
BACKBONES = {"ddpm": {"path": None, "arch": "adm-28-small"},
             "random": {"arch": "adm-28-small", "random_weights": True}}
# about 100k parameters each at 64-channel maps (the linear probe has no width to set)
HEAD_PARAMS = {"linear": {}, "mlp": {"hidden": [96]}, "cnn": {"width": [80], "depth": [2]},
               "attention": {"dim": [64], "heads": [4], "depth": [2]},
               "fusion": {"dim": [64], "heads": [4], "depth": [2]}, "mixing": {"dim": [512], "side": [8]}}
# sized for a 2-core CPU (the whole default run about half an hour; see the README)
DEFAULT = {"train": 4000, "val": 1000, "test": None, "t": [10, 25], "block": [8, 10], "pool": [1, 2, 4],
           "epochs": 4, "max_concurrent": 2}
# the format check of the tests: one 7x7 map, one epoch, tiny splits (12 sweeps' overhead dominates),
# one trial at a time (a second concurrent trial is a second worker process to start)
QUICK = {"train": 300, "val": 100, "test": 200, "t": [10], "block": [8], "pool": [1, 2], "epochs": 1,
         "max_concurrent": 1}


def fusion_sets(ts: list[int], blocks: list[int]) -> list[list[list[int]]]:
    """Pairs of maps for the fusion head: two blocks at each t, and the first block at two t."""
    sets = [[[t, blocks[0]], [t, blocks[-1]]] for t in ts] if len(blocks) > 1 else []
    if len(ts) > 1:
        sets.append([[ts[0], blocks[0]], [ts[-1], blocks[0]]])
    return sets or [[[ts[0], blocks[0]]]]


def sweep_spec(head: str, backbone: str, sizes: dict, root: Path, store: str) -> dict:
    limit = {"train": sizes["train"], "val": sizes["val"], **({"test": sizes["test"]} if sizes["test"] else {})}
    space = {"t": sizes["t"], "block": sizes["block"], "head": {head: HEAD_PARAMS[head]}}
    if head in ("linear", "mlp"):
        space["pool"] = sizes["pool"]
    if head == "fusion":
        space["fusion_maps"] = fusion_sets(sizes["t"], sizes["block"])
    epochs = sizes["epochs"]
    asha = {"max_t": epochs, "grace_period": max(1, epochs // 2), "reduction_factor": 2} if epochs > 1 else None
    name = f"heads-{head}-{backbone}"
    return {"name": name, "seed": 0, "checkpoint": BACKBONES[backbone],
            "datasets": [{"name": "fashion_mnist", "val_fraction": 0.1, "limit": limit}],
            "space": space, "search": {"sampler": "grid", "max_concurrent": sizes["max_concurrent"], "asha": asha},
            "training": {"recipe": "adamw", "batch_size": 128}, "resources": {"cpu": 1, "gpu": 0},
            "store": {"path": store}, "tracking": {"uri": f"sqlite:///{root}/mlruns.db"},
            "storage_path": str(root / "ray"), "export_dir": str(root / "exported" / name)}


def run_one(head: str, backbone: str, sizes: dict, root: Path, store: str, evaluate: bool) -> dict:
    from orchestrator.config import load_config
    from orchestrator.sweep import run_sweep

    spec = sweep_spec(head, backbone, sizes, root, store)
    path = root / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    cfg = load_config(path)  # the same validation `diffsweep run` does
    start = time.perf_counter()
    outcome = run_sweep(cfg)
    wall = time.perf_counter() - start
    sel = outcome.selected.get("fashion_mnist")
    results = outcome.results
    row = {"head": head, "weights": backbone, "wall_s": wall, "trials": len(results),
           "completed": int((results.status == "completed").sum())}
    if sel is None:  # no trial ran to max_t: nothing selected, nothing read from test
        return {**row, "val_acc": float("nan"), "test_acc": float("nan"), "params": None, "maps": []}
    export = yaml.safe_load(Path(sel["yaml"]).read_text())
    row.update(val_acc=sel["val_acc"], test_acc=sel["test_acc"], params=int(export["head"]["params"]),
               maps=[tuple(m) for m in export["features"]["maps"]], pool=sel.get("pool"),
               test_n=int(export["selection"]["test_n"]))
    if evaluate:
        from orchestrator.predict import evaluate as evaluate_export
        row["evaluate_acc"] = evaluate_export(sel["yaml"], "test")["accuracy"]
    return row


def where(row: dict) -> str:
    maps = row.get("maps") or []
    if not maps:
        return "-"
    text = "+".join(f"t{t}/b{b}" for t, b in maps)
    return text + (f" p{int(row['pool'])}" if row.get("pool") is not None and row["head"] in ("linear", "mlp") else "")


def plot(rows: list[dict], path: Path, title: str) -> Path:
    from orchestrator import plots  # noqa: F401  (matplotlib's Agg backend)
    import matplotlib.pyplot as plt
    import numpy as np

    heads = [h for h in HEADS if any(r["head"] == h for r in rows)]
    acc = {(r["head"], r["weights"]): r for r in rows}
    x = np.arange(len(heads))
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(heads), 3.8))
    for i, (weights, color) in enumerate((("ddpm", "tab:blue"), ("random", "tab:gray"))):
        test = [100 * acc[(h, weights)]["test_acc"] if (h, weights) in acc else np.nan for h in heads]
        val = [100 * acc[(h, weights)]["val_acc"] if (h, weights) in acc else np.nan for h in heads]
        bars = ax.bar(x + (i - 0.5) * 0.38, test, 0.38, color=color,
                      label=f"{'shipped DDPM' if weights == 'ddpm' else 'same U-Net, random weights'}: test")
        ax.scatter(x + (i - 0.5) * 0.38, val, marker="_", s=300, color="k", zorder=3,
                   label="val (chosen on)" if i == 0 else None)
        for b, v in zip(bars, test):
            if np.isfinite(v):
                ax.text(b.get_x() + b.get_width() / 2, v + 0.15, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    finite = [100 * r[k] for r in rows for k in ("test_acc", "val_acc") if np.isfinite(r[k])]
    if finite:
        ax.set_ylim(max(0, min(finite) - 3), min(100, max(finite) + 2))
    labels = [f"{h}\n{acc[(h, 'ddpm')]['params'] / 1000:.0f}k" if (h, "ddpm") in acc and acc[(h, "ddpm")]["params"]
              else h for h in heads]
    ax.set_xticks(x, labels)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="300 train / 100 val / 200 test, t=10, block 8, 1 epoch (the tests)")
    p.add_argument("--heads", default=",".join(HEADS), help="comma-separated subset of " + ",".join(HEADS))
    p.add_argument("--weights", default="ddpm,random", help="ddpm, random or both")
    p.add_argument("--train", type=int, help="train images (seeded stratified subset of the 54k)")
    p.add_argument("--val", type=int, help="val images (subset of the 6k carved from train)")
    p.add_argument("--test", type=int, help="test images (default: all 10,000)")
    p.add_argument("--epochs", type=int, help="max_t of every sweep (ASHA rung at half); default 4, quick 1")
    p.add_argument("--workdir", help="sweep state, MLflow sqlite and exports (default: a temp dir)")
    p.add_argument("--store", help="feature store (default: <workdir>/store); reuse one to skip extraction")
    p.add_argument("--plot", default=None, help="PNG path (default benchmarks/head_comparison.png; "
                   "quick: <workdir>/head_comparison.png)")
    p.add_argument("--evaluate", action="store_true",
                   help="also rescore each export with `diffsweep evaluate`'s path (a check, same test images)")
    args = p.parse_args()
    sizes = dict(QUICK if args.quick else DEFAULT)
    for k in ("train", "val", "test", "epochs"):
        if getattr(args, k) is not None:
            sizes[k] = getattr(args, k)
    heads = [h for h in args.heads.split(",") if h]
    weights = [w for w in args.weights.split(",") if w]
    bad = [h for h in heads if h not in HEADS] + [w for w in weights if w not in BACKBONES]
    if bad:
        p.error(f"unknown head or weights: {', '.join(bad)}")
    if not Path("/usr/share/datasets/fashion-mnist").exists():
        raise SystemExit("Fashion-MNIST not found: apt-get install dataset-fashion-mnist (make fashion-mnist)")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from orchestrator.sweep import init_ray
    import ray

    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="head_comparison_") as tmp:
        root = Path(args.workdir or tmp).resolve()
        root.mkdir(parents=True, exist_ok=True)
        store = str(Path(args.store).resolve() if args.store else root / "store")
        init_ray(None)  # one local Ray for every sweep (run_sweep reuses it)
        for backbone in weights:
            for head in heads:
                print(f"=== {head} / {backbone}", flush=True)
                rows.append(run_one(head, backbone, sizes, root, store, args.evaluate))
                print(f"=== {head} / {backbone}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'maps'})}",
                      flush=True)
        ray.shutdown()
        png = Path(args.plot) if args.plot else (root / "head_comparison.png" if args.quick
                                                  else common.ROOT / "benchmarks" / "head_comparison.png")
        test_n = next((r["test_n"] for r in rows if r.get("test_n")), sizes["test"])
        title = (f"Fashion-MNIST, adm-28-small: train {sizes['train']} / val {sizes['val']} / test {test_n}, "
                 f"{sizes['epochs']} epochs; (t, block, pool) chosen on val per head")
        plot(rows, png, title)
        total = time.perf_counter() - start
        print()
        print(title)
        print(f"{'head':<10} {'weights':<7} {'val_acc':>7} {'test_acc':>8} {'params':>8} {'wall_s':>7}  "
              f"{'trials':>6}  selected")
        for r in rows:
            extra = f"  evaluate {r['evaluate_acc']:.4f}" if "evaluate_acc" in r else ""
            params = f"{r['params']:>8d}" if r["params"] else f"{'-':>8}"
            print(f"{r['head']:<10} {r['weights']:<7} {r['val_acc']:>7.4f} {r['test_acc']:>8.4f} {params} "
                  f"{r['wall_s']:>7.1f}  {r['completed']:>2}/{r['trials']:<3}  {where(r)}{extra}")
        print(f"test evaluations: {sum(1 for r in rows if r.get('test_n'))} (one per head x weights, after "
              f"selection); total wall {total:.0f} s; plot {png}")
    pairs = [(h, {r["weights"]: r["test_acc"] for r in rows if r["head"] == h}) for h in heads]
    pairs = [(h, d) for h, d in pairs if "ddpm" in d and "random" in d]
    beats = sum(1 for _, d in pairs if d["ddpm"] > d["random"])
    print(f"ddpm_beats_random={beats}/{len(pairs)}")


if __name__ == "__main__":
    main()
