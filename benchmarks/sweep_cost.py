"""What the feature store saves: U-Net image-passes and wall time of a 48-trial sweep, two ways.

(a) diffsweep: features extracted once per (split, t), all the space's blocks captured in one pass
    (`fill_request` over train and val for each t), then 48 head trainings that read the store
    (memory-mapped Arrow).
(b) the paper's way: no store. For every trial and every epoch, the U-Net runs again over the train
    images (and the val images for that epoch's evaluation) for the trial's (t, block), with the same
    `extract_batch` code (which stops after the trial's block, so (b) is if anything cheaper than a
    full forward with a hook), and the head trains one epoch on those fresh features.

Both run the same heads (HeadTrainer, AdamW recipe, same seed) for the same epochs. Image-passes are
counted exactly for both. The space is 4 t x 6 blocks x 2 pools x 1 head (linear) = 48 trials.

With --quick, (b) runs one trial per block (6 of 48, all epochs) and its wall time is extrapolated
linearly: each trial costs what the measured trial with the same block cost (t and pool do not change
the U-Net's or the linear head's cost). The output says so. The pass ratio is 48*epochs/4 = 12*epochs
by construction and grows with epochs (the paper trains 28 epochs).

    .venv/bin/python benchmarks/sweep_cost.py --quick
    .venv/bin/python benchmarks/sweep_cost.py --dataset fashion_mnist --limit 2000 --epochs 10
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

import common  # noqa: F401  (puts the checkout on sys.path)
import numpy as np
import torch

T_VALUES = (10, 50, 100, 300)
BLOCKS = (3, 4, 6, 7, 8, 10)  # adm-28-small: 14x14 and 7x7 maps, encoder, middle and decoder
POOLS = (1, 2)


def paper_split_features(model, samples, flags, t, block, batch_size, noise_seed, max_spatial):
    """Re-extract one split for one (t, block), no store. Returns (FeatureArray, image passes)."""
    from trials.datasets.preprocess import iter_batches
    from trials.features import extract_batch
    from trials.store import FeatureArray

    maps, labels, ids = [], [], []
    for x, batch in iter_batches(samples, flags["image_size"], flags["in_channels"], batch_size):
        batch_ids = [s.image_id for s in batch]
        maps.append(extract_batch(model, torch.from_numpy(x), batch_ids, t, [block], noise_seed, max_spatial)[block])
        labels.extend(s.label for s in batch)
        ids.extend(batch_ids)
    return FeatureArray([np.concatenate(maps)], np.array(labels, dtype=np.int32), ids), len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small subset, epochs 3, (b) on 6 of 48 trials, <~60 s")
    ap.add_argument("--dataset", default="digits", help="digits (default) or fashion_mnist")
    ap.add_argument("--limit", type=int, default=None,
                    help="seeded stratified subset of N train images (and N/4 val); quick default 400")
    ap.add_argument("--epochs", type=int, default=None, help="head epochs per trial (default 10; quick 3)")
    ap.add_argument("--paper-trials", type=int, default=None,
                    help="run (b) on this many trials (one per block first) and extrapolate; default all "
                         "(quick: 6)")
    ap.add_argument("--checkpoint", default=None, help="U-Net weights (default: the shipped small DDPM)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the same for (a) and (b)")
    ap.add_argument("--batch-size", type=int, default=128, help="extraction batch size")
    args = ap.parse_args()
    epochs = args.epochs or (3 if args.quick else 10)
    limit = args.limit if args.limit is not None else (400 if args.quick else None)
    n_paper = args.paper_trials or (len(BLOCKS) if args.quick else None)
    common.set_threads(args.threads)

    from trials.features import dataset_splits, load_backbone
    from trials.store import FeatureStore
    from trials.train_head import HeadTrainer, Recipe

    bb = common.backbone("adm-28-small", args.checkpoint)
    ds = common.dataset(args.dataset, limit, limit // 4 if limit else None)
    classes, splits = dataset_splits(ds)
    n_train, n_val = len(splits["train"]), len(splits["val"])
    trials = [dict(t=t, block=b, pool=p) for t, b, p in itertools.product(T_VALUES, BLOCKS, POOLS)]
    recipe = Recipe("adamw", epochs, 128)
    print(f"sweep_cost: {args.dataset} train={n_train} val={n_val}, {len(trials)} trials "
          f"({len(T_VALUES)} t x {len(BLOCKS)} blocks x {len(POOLS)} pools x linear), epochs={epochs}, "
          f"torch threads={args.threads}, device={'cuda' if torch.cuda.is_available() else 'cpu'}", flush=True)

    # (a) diffsweep: fill the store once, then train every trial from it.
    with tempfile.TemporaryDirectory(prefix="sweep_cost_") as root:
        t0 = time.perf_counter()
        passes_a, extract_s = common.fill_store(bb, ds, T_VALUES, BLOCKS, root, batch_size=args.batch_size)
        accs_a = {}
        store = FeatureStore(root)
        for i, c in enumerate(trials):
            train = [store.read(common.request(bb, ds, "train", [c["t"]], [c["block"]]).key(c["t"], c["block"]))]
            val = [store.read(common.request(bb, ds, "val", [c["t"]], [c["block"]]).key(c["t"], c["block"]))]
            trainer = HeadTrainer("linear", {"pool": c["pool"]}, train, len(classes), recipe, 0)
            for m in trainer.epochs(val):
                accs_a[i] = m["val_acc"]
        wall_a = time.perf_counter() - t0
    heads_a = wall_a - extract_s
    print(f"(a) diffsweep: {passes_a} image-passes (= {n_train + n_val} images x {len(T_VALUES)} t), "
          f"extract {extract_s:.1f}s + {len(trials)} head trainings {heads_a:.1f}s = {wall_a:.1f}s", flush=True)

    # (b) the paper's way: re-extract per trial per epoch.
    passes_b = len(trials) * epochs * (n_train + n_val)  # exact: every trial, every epoch, train + val
    order = list(range(len(trials)))
    np.random.default_rng(0).shuffle(order)
    first_per_block = {}
    for i in order:
        first_per_block.setdefault(trials[i]["block"], i)
    chosen = list(first_per_block.values()) + [i for i in order if i not in first_per_block.values()]
    chosen = chosen[:n_paper] if n_paper else list(range(len(trials)))
    model = load_backbone(bb, "cuda" if torch.cuda.is_available() else "cpu")
    flags = bb.flags
    seconds, counted, same = {}, 0, 0
    for i in chosen:
        c = trials[i]
        t0 = time.perf_counter()
        trainer = None
        for _ in range(epochs):
            train, n = paper_split_features(model, splits["train"], flags, c["t"], c["block"], args.batch_size, 0, 16)
            counted += n
            if trainer is None:
                trainer = HeadTrainer("linear", {"pool": c["pool"]}, [train], len(classes), recipe, 0)
            trainer.train = [train]
            trainer.train_epoch()
            val, n = paper_split_features(model, splits["val"], flags, c["t"], c["block"], args.batch_size, 0, 16)
            counted += n
            acc = trainer.accuracy([val])
        seconds[i] = time.perf_counter() - t0
        same += abs(acc - accs_a[i]) < 1e-9
    assert counted == len(chosen) * epochs * (n_train + n_val)
    if len(chosen) == len(trials):
        wall_b, how = sum(seconds.values()), "measured on all trials"
    else:
        per_block = {trials[i]["block"]: s for i, s in seconds.items() if i in first_per_block.values()}
        wall_b = sum(per_block[c["block"]] for c in trials)
        how = (f"EXTRAPOLATED: measured {len(chosen)} of {len(trials)} trials (one per block, all {epochs} epochs), "
               "each other trial costed as the measured trial with its block")
    print(f"(b) paper way: {passes_b} image-passes (= {len(trials)} trials x {epochs} epochs x "
          f"{n_train + n_val} images), wall {wall_b:.1f}s [{how}]", flush=True)
    print(f"    same final val accuracy as (a) on {same}/{len(chosen)} measured trials "
          "(features are a pure function of (image, t, noise seed), so they should all match)")
    print(f"ratios (b)/(a) at epochs={epochs}: image-passes {passes_b / passes_a:.1f}x, wall {wall_b / wall_a:.1f}x "
          f"(the pass ratio is 12 x epochs here; target >= 20)")
    print(f"image_pass_ratio={passes_b / passes_a:.2f} wall_ratio={wall_b / wall_a:.2f}")


if __name__ == "__main__":
    main()
