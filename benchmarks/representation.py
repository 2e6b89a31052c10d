"""Does pretraining help, or only head capacity? Fashion-MNIST features from (a) raw pixels, (b) the
same U-Net with random weights, (c) the shipped DDPM, under the paper's linear-probe protocol (BN +
linear on pooled features, the same search over t, block, pool, chosen on validation) and with the
best head. Everything in one run, test accuracy reported once per selected config.

    python benchmarks/representation.py            # 20k train subset, full 10k test
    python benchmarks/representation.py --full     # the sweep's splits: all 54k train, 6k val, 10k test
    python benchmarks/representation.py --quick    # 3k train subset, 2k test

Pools 1, 2, 4 and 7 cover the sweep's own (4, 7). `--recipe paper` trains every head with the
paper's SGD schedule (28 epochs by default) instead of AdamW + cosine; `--store DIR` keeps the
extracted maps (content-addressed) so a rerun only trains heads.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

import common
import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.config import SHIPPED_CHECKPOINT
from trials.ddpm import sha256_file
from trials.features import BackboneSpec, DatasetSpec, FillOptions, dataset_splits, fill_request
from trials.store import FeatureArray, FeatureStore
from trials.train_head import HeadTrainer, Recipe


def pixels(spec: DatasetSpec, split: str) -> FeatureArray:
    """Raw pixels in [-1, 1] as a 1×28×28 'feature map'."""
    _, splits = dataset_splits(spec)
    samples = splits[split]
    x = np.stack([s.source for s in samples]).astype(np.float32)[:, None] / 127.5 - 1
    return FeatureArray([x.astype(np.float16)], np.array([s.label for s in samples]), [s.image_id for s in samples])


def pooled(array: FeatureArray, pools: list[int], chunk: int = 4096) -> dict[int, FeatureArray]:
    """The map average-pooled to each pool×pool in one read, in fp32: the same numbers the linear
    head's own pooling computes per batch, so each probe epoch is only a small matmul (fast at 54k
    images), and a map larger than RAM is read from disk once, not once per pool size."""
    out: dict[int, list[np.ndarray]] = {p: [] for p in pools}
    for start in range(0, len(array), chunk):
        x = torch.from_numpy(array.take(np.arange(start, min(start + chunk, len(array))))).float()
        for p in pools:
            out[p].append(F.adaptive_avg_pool2d(x, min(p, x.shape[-1])).numpy())
    return {p: FeatureArray([np.concatenate(v)], array.labels, array.image_ids) for p, v in out.items()}


def fit(head: str, hparams: dict, train, val, test, epochs: int, recipe: str = "adamw",
        classes: int = 10) -> tuple[float, float]:
    if recipe == "paper":  # the paper's own learning rates (SGD), not the AdamW ones below
        hparams = {k: v for k, v in hparams.items() if k != "lr"}
    trainer = HeadTrainer(head, hparams, [train], classes, Recipe(recipe, epochs, 128), seed=0)
    while trainer.epoch < epochs:
        trainer.train_epoch()
    return trainer.accuracy([val]), trainer.accuracy([test])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--full", action="store_true", help="no subsets: the splits search_spaces/fashion_mnist.yaml uses")
    p.add_argument("--epochs", type=int, default=None, help="default 8 (adamw), 28 (paper), 4 with --quick")
    p.add_argument("--recipe", choices=("adamw", "paper"), default="adamw",
                   help="adamw: AdamW + cosine; paper: SGD m=0.9, lr 1e-2, ×0.1 every quarter of the epochs")
    p.add_argument("--store", default=None, help="keep extracted maps here and reuse them (default: a temp dir)")
    p.add_argument("--train", type=int, default=None, help="train images (seeded stratified subset)")
    p.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="adm-28-small DDPM weights (default: shipped)")
    p.add_argument("--heads", default="mlp,cnn", help="heads tried at the linear probe's (t, block); "
                   "cnn on 28×28 pixels costs minutes per epoch on a CPU")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    n_train, n_test = (3000, 2000) if args.quick else (20000, None)
    n_train = args.train or n_train
    epochs = args.epochs or (4 if args.quick else 28 if args.recipe == "paper" else 8)
    limits = {} if args.full else {"train": n_train, "val": n_train // 5, **({"test": n_test} if n_test else {})}
    spec = DatasetSpec("fashion_mnist", None, 0.1, tuple(sorted(limits.items())))
    ts, blocks, pools = [10, 50, 150], [6, 8, 9, 10], [1, 2, 4, 7]
    backbones = {
        "ddpm": BackboneSpec("adm-28-small", args.checkpoint, sha256_file(args.checkpoint)),
        "random": BackboneSpec("adm-28-small", None, "random:0"),
    }
    rows = []
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.store or tmp
        store = FeatureStore(root)
        for name, bb in backbones.items():
            for split in ("train", "val", "test"):
                fill_request(common.request(bb, spec, split, ts, blocks), FillOptions(root))

        def arrays(name, t, block):
            return [store.read(common.request(backbones[name], spec, s, [t], [block]).key(t, block))
                    for s in ("train", "val", "test")]

        # (a) pixels: the linear probe over pool sizes (28 = every pixel: logistic regression on raw pixels)
        px = [pixels(spec, s) for s in ("train", "val", "test")]
        results = {}
        px_pooled = [pooled(a, [4, 7, 14, 28]) for a in px]
        for pool in (4, 7, 14, 28):
            val, test = fit("linear", {"pool": pool, "lr": 3e-3}, *[a[pool] for a in px_pooled], epochs, args.recipe)
            results.setdefault("pixels", []).append((val, test, {"pool": pool}))
        for name in backbones:
            for t, block in itertools.product(ts, blocks):
                maps = [pooled(a, pools) for a in arrays(name, t, block)]
                for pool in pools:
                    val, test = fit("linear", {"pool": pool, "lr": 3e-3}, *[a[pool] for a in maps], epochs, args.recipe)
                    results.setdefault(name, []).append((val, test, {"t": t, "block": block, "pool": pool}))
        for name, runs in results.items():
            val, test, cfg = max(runs, key=lambda r: r[0])  # chosen on validation only
            rows.append((name, "linear probe", cfg, val, test))
        # best head: mlp and cnn at each backbone's linear-probe (t, block), chosen on validation
        heads = {"mlp": {"pool": 4, "hidden": 1024, "dropout": 0.2, "lr": 1e-3}, "cnn": {"width": 128, "depth": 2, "lr": 1e-3}}
        heads = {h: heads[h] for h in args.heads.split(",")}
        for name, runs in results.items():
            best_cfg = max(runs, key=lambda r: r[0])[2]
            data = px if name == "pixels" else arrays(name, best_cfg["t"], best_cfg["block"])
            per_head = []
            for head, hp in heads.items():
                val, test = fit(head, hp, *data, epochs, args.recipe)
                where = {k: v for k, v in best_cfg.items() if k != "pool"}
                if "pool" in hp:  # the head's own pooling, not the linear probe's
                    where["pool"] = hp["pool"]
                per_head.append((val, test, head, where))
                rows.append((name, f"head={head}", where, val, test))
            val, test, head, where = max(per_head, key=lambda r: r[0])  # chosen on validation only
            rows.append((name, f"best head ({head})", where, val, test))
    sizes = {s: len(dataset_splits(spec)[1][s]) for s in ("train", "val", "test")}
    print(f"Fashion-MNIST, train {sizes['train']} / val {sizes['val']} / test {sizes['test']}, "
          f"{args.recipe}, {epochs} epochs, {time.time() - start:.0f}s")
    print(f"{'features':<8} {'protocol':<18} {'val_acc':>7} {'test_acc':>8}  config")
    for name, proto, cfg, val, test in rows:
        print(f"{name:<8} {proto:<18} {val:>7.4f} {test:>8.4f}  {cfg}")
    lin = {name: test for name, proto, _, _, test in rows if proto == "linear probe"}
    print(f"linear_probe_margin_vs_pixels={100 * (lin['ddpm'] - lin['pixels']):.2f}pts "
          f"margin_vs_random={100 * (lin['ddpm'] - lin['random']):.2f}pts")


if __name__ == "__main__":
    main()
