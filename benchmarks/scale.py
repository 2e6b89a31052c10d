"""Paper scale on one machine: does memory, I/O and disk stay bounded as the dataset grows?

Paper-shaped maps: a real U-Net with the paper's widths where it is read (1024 channels at 16×16,
the shape of adm-256-uncond's block 24), at a 32×32 input so it runs on a CPU. Everything below
goes through the sweep's own code path, and each figure is against a baseline measured in the same
run:

1. extraction: `trials.features.fill_request` (the store fill loop the sweep's part tasks run) over N
   and 4N images, each in a fresh process; peak RSS (VmHWM) at 4N over N. Also printed: the
   `memory=` the task declares to Ray (`extraction_memory_bytes`) beside the measured peak.
2. plan: `diffsweep plan`'s byte estimate (`orchestrator.plan.sweep_plan`) of the same fill against
   the bytes the store then holds.
3. trial memory: a linear-probe trial (`trials.trainable.load_split` with its pooled cache +
   `HeadTrainer`) over M and 4M Fashion-MNIST train images whose maps are paper-shaped, each in a
   fresh process; growth of anonymous memory per image.
4. pooled epoch: one linear-probe epoch on the pooled cache against the same epoch on the full map
   (pooled by the head on every batch: the path trials took before the cache), same data, same head.
5. checkpoints: a real small sweep (`diffsweep run`'s `run_sweep`, Ray Tune + MLflow); checkpoints
   that still hold weights per finished trial (superseded ones keep only their epoch file).

    .venv/bin/python benchmarks/scale.py --quick
    .venv/bin/python benchmarks/scale.py

Last line: extract_rss_ratio=<x> trial_kb_per_image=<x> pooled_epoch_speedup=<x> ckpt_per_trial=<n>
plan_bytes_error=<x>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

# 32×32 input: input_blocks[3] (block 4) is a 128 -> 1024-channel ResBlock at 16×16, i.e. the
# widths of adm-256-uncond's block 24 (1024 channels at 16×16) at a CPU-sized input.
PAPER_SHAPED = {"image_size": 32, "in_channels": 3, "num_channels": 128, "channel_mult": "1,8",
                "num_res_blocks": 1, "attention_resolutions": "", "learn_sigma": True,
                "use_scale_shift_norm": True, "resblock_updown": True}
BLOCK = 4
MAP = (1024, 16, 16)
FMNIST = "/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz"


def proc_status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f) if v.strip().endswith("kB")}


def _backbone():
    from trials.features import BackboneSpec
    return BackboneSpec(tuple(sorted(PAPER_SHAPED.items())), None, "random:0")


def _extract_request(n: int):
    from trials.features import DatasetSpec, FeatureRequest
    return FeatureRequest(_backbone(), DatasetSpec("digits", limits=(("train", n),), val_fraction=0.15), "train",
                          (90,), (BLOCK,))


def child_extract(root: str, n: int, batch: int) -> None:
    import torch

    from trials.features import FillOptions, extraction_memory_bytes, fill_request

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))  # the test suite's 1: no idle spinning
    request = _extract_request(n)
    t0 = time.perf_counter()
    stats = fill_request(request, FillOptions(root, batch_size=batch, part_bytes=32 * 2 ** 20))
    print(json.dumps({"n": stats.images, "seconds": time.perf_counter() - t0, "hwm_kb": proc_status()["VmHWM"],
                      "declared": extraction_memory_bytes(request, batch)}))


def _trial_setup(root: str, m: int):
    from trials.features import BackboneSpec, DatasetSpec, FillOptions
    from trials.train_head import Recipe
    from trials.trainable import TrialSetup

    spec = DatasetSpec("fashion_mnist", limits=(("train", m), ("val", max(200, m // 5))), val_fraction=0.1)
    return TrialSetup(sweep="scale", backbone=BackboneSpec(tuple(sorted(PAPER_SHAPED.items())), None, "random:0"),
                      datasets={"fashion_mnist": spec}, fill=FillOptions(root), noise_seed=0,
                      space_blocks={90: (BLOCK,)}, recipe=Recipe("adamw", 2, 128), space_pools=(1,))


def write_synthetic_maps(root: str, m: int) -> None:
    """Paper-shaped fp16 maps under the real keys of M Fashion-MNIST images, streamed in parts."""
    import numpy as np

    from trials.store import FeatureStore

    setup = _trial_setup(root, m)
    store = FeatureStore(root)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        request = setup.request("fashion_mnist", split, 90)
        samples = request.samples()
        with store.part_writer(request.key(90, BLOCK), 0, 1, MAP) as w:
            for lo in range(0, len(samples), 256):
                chunk = samples[lo:lo + 256]
                labels = np.array([s.label for s in chunk])
                x = rng.standard_normal((len(chunk), *MAP), dtype=np.float32).astype(np.float16)
                x[np.arange(len(chunk)), labels * 7] += 2.0  # a learnable signal
                w.write(x, labels, [s.image_id for s in chunk])


def child_trial(root: str, m: int) -> None:
    """A linear-probe trial as `train_trial` runs it (without Ray): pooled cache, head, epochs."""
    import torch

    from trials.features import dataset_splits
    from trials.train_head import HeadTrainer
    from trials.trainable import load_split

    torch.set_num_threads(1)
    setup = _trial_setup(root, m)
    dataset_splits(setup.datasets["fashion_mnist"])  # the dataset index is the same for M and 4M: not counted
    import numpy as np  # noqa: F401
    base = proc_status()["RssAnon"]
    train = load_split(setup, "fashion_mnist", "train", [(90, BLOCK)], pool=1)
    val = load_split(setup, "fashion_mnist", "val", [(90, BLOCK)], pool=1)
    trainer = HeadTrainer("linear", {"pool": 1}, train, 10, setup.recipe, 0)
    acc = [x["val_acc"] for x in trainer.epochs(val)][-1]
    print(json.dumps({"m": m, "anon_kb": proc_status()["RssAnon"] - base, "val_acc": acc}))


def pooled_epoch_speedup(root: str, m: int) -> tuple[float, float, float]:
    """Seconds of one linear-probe epoch: full map pooled per batch (before) vs the pooled cache."""
    import torch

    from trials.train_head import HeadTrainer
    from trials.trainable import load_split

    torch.set_num_threads(1)
    setup = _trial_setup(root, m)
    full = load_split(setup, "fashion_mnist", "train", [(90, BLOCK)])
    pooled = load_split(setup, "fashion_mnist", "train", [(90, BLOCK)], pool=1)
    times = {}
    for name, arrays in (("full", full), ("pooled", pooled)):
        trainer = HeadTrainer("linear", {"pool": 1}, arrays, 10, setup.recipe, 0)
        t0 = time.perf_counter()
        trainer.train_epoch()
        times[name] = time.perf_counter() - t0
    return times["full"] / times["pooled"], times["full"], times["pooled"]


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONPATH": str(common.ROOT)})
    if out.returncode:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan_error(root: str, n: int, batch: int) -> tuple[float, int, int]:
    """`diffsweep plan`'s bytes for a digits sweep on the paper-shaped model vs what the fill wrote."""
    import yaml

    from orchestrator.config import load_config
    from orchestrator.plan import sweep_plan
    from orchestrator.sweep import trial_setup
    from trials.features import fill_request
    from trials.store import FeatureStore

    spec = {"name": "scale-plan", "checkpoint": {"arch": PAPER_SHAPED, "random_weights": True},
            "datasets": [{"name": "digits", "val_fraction": 0.15, "limit": {"train": n, "val": max(10, n // 4)}}],
            "space": {"t": [90], "block": [BLOCK], "pool": [1], "head": {"linear": {}}},
            "store": {"path": f"{root}/store", "batch_size": batch, "part_bytes": 32 * 2 ** 20},
            "tracking": {"uri": f"sqlite:///{root}/mlruns.db"}, "storage_path": f"{root}/ray",
            "export_dir": f"{root}/exported"}
    path = Path(root) / "scale-plan.yaml"
    path.write_text(yaml.safe_dump(spec))
    cfg = load_config(path)
    setup = trial_setup(cfg)
    plan = sweep_plan(cfg, setup)
    store = FeatureStore(setup.store_root)
    actual = 0
    for split in ("train", "val"):
        request = setup.request("digits", split, 90)
        fill_request(request, setup.fill)
        actual += store.nbytes(request.key(90, BLOCK))
    estimate = plan["feature_bytes"]["fill"]
    return abs(estimate - actual) / actual, estimate, actual


def checkpoints_per_trial(root: str) -> tuple[float, int]:
    """A real small sweep; checkpoints with weights left per finished trial, and all their folders' bytes."""
    import yaml

    from orchestrator.config import load_config
    from orchestrator.sweep import run_sweep, sweep_dir
    from trials.trainable import WEIGHTS_FILE

    spec = {"name": "scale-ckpt", "checkpoint": {"random_weights": True},
            "datasets": [{"name": "digits", "val_fraction": 0.15, "limit": {"train": 300, "val": 100, "test": 100}}],
            "space": {"t": [10], "block": [4], "pool": [1], "head": {"linear": {"lr": [0.001, 0.003, 0.01]}}},
            "search": {"sampler": "grid", "max_concurrent": 1, "asha": None},  # one trial process, reused
            "store": {"path": f"{root}/store"}, "tracking": {"uri": f"sqlite:///{root}/mlruns.db"},
            "storage_path": f"{root}/ray", "export_dir": f"{root}/exported"}
    path = Path(root) / "scale-ckpt.yaml"
    path.write_text(yaml.safe_dump(spec))
    cfg = load_config(path)
    outcome = run_sweep(cfg)
    trial_dirs = [d for d in sweep_dir(cfg).iterdir() if d.is_dir() and d.name.startswith("train_trial")]
    folders = [c for d in trial_dirs for c in d.glob("checkpoint_*")]
    # a superseded checkpoint keeps only its epoch file (orchestrator/checkpoints.py): count those with weights
    ckpts = [c for c in folders if (c / WEIGHTS_FILE).exists()]
    nbytes = sum(f.stat().st_size for c in folders for f in c.rglob("*") if f.is_file())
    finished = int((outcome.results.status == "completed").sum())
    return len(ckpts) / max(finished, 1), nbytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small N and M (the test suite runs this)")
    p.add_argument("--images", type=int, help="N, extraction images (4N are run too); default 256, quick 48")
    p.add_argument("--trial-images", type=int, help="M, trial images (4M too); default 2000, quick 600")
    p.add_argument("--batch", type=int, default=16, help="U-Net batch of the extraction")
    p.add_argument("--child-extract", nargs=2, metavar=("ROOT", "N"), help=argparse.SUPPRESS)
    p.add_argument("--child-trial", nargs=2, metavar=("ROOT", "M"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_extract:
        return child_extract(args.child_extract[0], int(args.child_extract[1]), args.batch)
    if args.child_trial:
        return child_trial(args.child_trial[0], int(args.child_trial[1]))
    if not Path(FMNIST).exists():
        raise SystemExit("Fashion-MNIST not found: apt-get install dataset-fashion-mnist (make fashion-mnist)")
    n = args.images or (48 if args.quick else 256)
    m = args.trial_images or (600 if args.quick else 2000)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="scale_") as tmp:
        ext = [run_child("--child-extract", f"{tmp}/x{k}", str(k * n), "--batch", str(args.batch)) for k in (1, 4)]
        rss_ratio = ext[1]["hwm_kb"] / ext[0]["hwm_kb"]
        for e in ext:
            print(f"extraction {e['n']:5d} images: peak RSS {e['hwm_kb'] / 1024:7.1f} MiB "
                  f"(declared to Ray {e['declared'] / 2 ** 20:.0f} MiB), {e['n'] / e['seconds']:.1f} img/s")
        err, est, actual = plan_error(tmp, n, args.batch)
        print(f"plan: estimated {est} bytes, the store holds {actual} bytes (error {100 * err:.2f} %)")
        trials = []
        for k in (1, 4):
            root = f"{tmp}/t{k}"
            write_synthetic_maps(root, k * m)
            trials.append(run_child("--child-trial", root, str(k * m)))
            print(f"trial {k * m:6d} images ({k * m * 512 / 1024:.0f} MiB of maps): anonymous memory "
                  f"+{trials[-1]['anon_kb'] / 1024:.1f} MiB after load + 2 epochs (val_acc {trials[-1]['val_acc']:.3f})")
        kb_per_image = max(0.0, (trials[1]["anon_kb"] - trials[0]["anon_kb"]) / (3 * m))
        speedup, t_full, t_pooled = pooled_epoch_speedup(f"{tmp}/t4", 4 * m)
        print(f"linear-probe epoch on {4 * m} images: full map pooled per batch {t_full:.2f} s, pooled cache "
              f"{t_pooled:.3f} s (x{speedup:.1f})")
        per_trial, ckpt_bytes = checkpoints_per_trial(tmp)
        print(f"checkpoints: {per_trial:.1f} per finished trial, {ckpt_bytes / 1024:.0f} KiB in all")
    print(f"extract_rss_ratio={rss_ratio:.3f} trial_kb_per_image={kb_per_image:.3f} "
          f"pooled_epoch_speedup={speedup:.1f} ckpt_per_trial={per_trial:.1f} plan_bytes_error={err:.4f}")


if __name__ == "__main__":
    main()
