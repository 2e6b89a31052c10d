"""Peak memory of one trial with 1x and 4x the images: does a trial's memory grow with the dataset?

A synthetic fp16 feature map (64 x 14 x 14, what adm-28-small's block 4 gives) is written to a
FeatureStore in a temporary folder for N and for 4N train images (plus N/5 and 4N/5 val images), in
parts of `--shard-size` images as the sweep's extraction writes them. Each measurement then runs in a
fresh subprocess that does what a trial does (trials.trainable.train_trial without Ray): read train
and val through FeatureStore.read (checksums verified, as the trainable does), build a HeadTrainer
(linear head) and train it for a few epochs with a val evaluation after each. The child reads
/proc/self/status at the end (VmHWM = peak RSS, RssAnon, RssFile) and samples RssAnon every 2 ms in
a thread to get the peak of anonymous memory, per phase (read / build / train).

Why anonymous memory is the number that matters: the store is memory-mapped, so feature pages a
trial touches are counted in its RSS as *file-backed* pages (RssFile). They are clean page cache:
shared between trials reading the same key, and the kernel drops them under pressure without
swapping. RSS therefore grows with the file size read (expected), while anonymous memory (heap:
batches, the head, optimiser state, labels) should stay flat. Anonymous growth from N to 4N images
means something copies whole arrays, and the per-phase peaks say where.

    .venv/bin/python benchmarks/trial_memory.py --quick
    .venv/bin/python benchmarks/trial_memory.py --images 4000 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import common  # noqa: F401  (puts the checkout on sys.path)
import numpy as np

SHAPE = (64, 14, 14)
NUM_CLASSES = 10


def key_for(split: str, n: int):
    from trials.store import FeatureKey
    return FeatureKey(checkpoint_sha256="synthetic", model_config="{}", dataset="synthetic", split=split,
                      files_digest=f"n{n}", preprocessing="{}", t=100, noise_seed=0, block=4, max_spatial=16)


def write_store(root: str, n: int, shard_size: int) -> None:
    """N synthetic images' features, written part by part like `fill_part` writes its parts."""
    from trials.store import FeatureStore

    store = FeatureStore(root)
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", max(2, n // 5))):
        parts = max(1, -(-count // shard_size))
        for p in range(parts):
            lo, hi = p * shard_size, min(count, (p + 1) * shard_size)
            labels = np.arange(lo, hi) % NUM_CLASSES
            feats = rng.standard_normal((hi - lo, *SHAPE), dtype=np.float32).astype(np.float16)
            feats[np.arange(hi - lo), labels % SHAPE[0]] += 1.0  # learnable signal
            store.write_part(key_for(split, n), feats, labels, [f"img-{i}" for i in range(lo, hi)], p, parts)


def proc_status() -> dict[str, int]:
    """kB values of /proc/self/status (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[name] = int(value.split()[0])
    return out


class AnonSampler(threading.Thread):
    """Peak RssAnon per phase, sampled every 2 ms (the end-of-run value misses transient copies)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.phase, self.peaks, self.running = "start", {}, True

    def run(self) -> None:
        while self.running:
            anon = proc_status().get("RssAnon", 0)
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), anon)
            time.sleep(0.002)

    def enter(self, phase: str) -> None:
        time.sleep(0.01)  # let the sampler see the end of the previous phase
        self.phase = phase


def child(root: str, n: int, epochs: int) -> None:
    """One trial, in a fresh process: read, build, train; then print JSON on stdout."""
    import torch

    from trials.store import FeatureStore
    from trials.train_head import HeadTrainer, Recipe

    torch.set_num_threads(1)
    sampler = AnonSampler()
    sampler.start()
    base = proc_status()
    sampler.enter("read")
    store = FeatureStore(root)
    train = store.read(key_for("train", n))
    val = store.read(key_for("val", n))
    after_read = proc_status()
    sampler.enter("build")
    trainer = HeadTrainer("linear", {"pool": 2}, [train], NUM_CLASSES, Recipe("adamw", epochs, 128), 0)
    sampler.enter("train")
    acc = 0.0
    for m in trainer.epochs([val]):
        acc = m["val_acc"]
    sampler.enter("end")
    end = proc_status()
    sampler.running = False
    sampler.join()
    print(json.dumps({"n": n, "val_acc": acc, "base": base, "after_read": after_read, "end": end,
                      "anon_peaks": sampler.peaks}))


def probe_read(root: str, n: int) -> None:
    """Where FeatureStore.read's copies come from, in a fresh process: anonymous MB added by each step
    of `FeatureStore._read_part` on the first train part; prints JSON."""
    import hashlib

    import pyarrow as pa
    import pyarrow.ipc as ipc

    from trials.store import FeatureStore

    path = FeatureStore(root)._part_paths(key_for("train", n))[0]
    before = proc_status()["RssAnon"]
    column = ipc.open_file(pa.memory_map(path)).read_all().column("features")
    zero_copy = column.chunk(0).to_numpy_ndarray()
    steps = {"read_all + chunk(0).to_numpy_ndarray": proc_status()["RssAnon"] - before}
    before = proc_status()["RssAnon"]
    combined = column.combine_chunks().to_numpy_ndarray()
    steps["combine_chunks().to_numpy_ndarray"] = proc_status()["RssAnon"] - before
    before = proc_status()["RssAnon"]
    blob = combined.tobytes()
    steps["tobytes (checksum)"] = proc_status()["RssAnon"] - before
    hashlib.blake2b(blob, digest_size=16)
    del blob, combined, zero_copy
    print(json.dumps({"part_mb": os.path.getsize(path) / 2 ** 20, **{k: v / 1024 for k, v in steps.items()}}))


def measure(root: str, n: int, epochs: int, mode: str = "--child") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), mode, root, "--images", str(n), "--epochs", str(epochs)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N=2000, 2 epochs (~20 s)")
    ap.add_argument("--images", type=int, default=None, help="N (default 4000; quick 2000); 4N is also measured")
    ap.add_argument("--epochs", type=int, default=None, help="head epochs (default 4; quick 2)")
    ap.add_argument("--shard-size", type=int, default=4096, help="images per store part (the sweep's default)")
    ap.add_argument("--child", metavar="ROOT", help=argparse.SUPPRESS)
    ap.add_argument("--probe", metavar="ROOT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = args.images or (2000 if args.quick else 4000)
    epochs = args.epochs or (2 if args.quick else 4)
    if args.child:
        return child(args.child, n, epochs)
    if args.probe:
        return probe_read(args.probe, n)
    if not os.path.exists("/proc/self/status"):
        raise SystemExit("trial_memory needs Linux /proc/self/status")

    mb = 1 / 1024  # kB -> MB
    rows = {}
    with tempfile.TemporaryDirectory(prefix="trial_memory_") as root:
        for count in (n, 4 * n):
            write_store(root, count, args.shard_size)
            rows[count] = r = measure(root, count, epochs)
            if count == 4 * n:
                read_probe = measure(root, count, epochs, "--probe")
            data_mb = (count + max(2, count // 5)) * int(np.prod(SHAPE)) * 2 / 2 ** 20
            b, e = r["base"], r["end"]
            print(f"{count:6d} train images ({data_mb:6.1f} MB of fp16 features, train+val): "
                  f"peak RSS {e['VmHWM'] * mb:7.1f} MB | at end RssAnon {e['RssAnon'] * mb:6.1f} MB, "
                  f"RssFile {e['RssFile'] * mb:6.1f} MB | val_acc {r['val_acc']:.3f}", flush=True)
            print("        anonymous memory above the post-import baseline "
                  f"({b['RssAnon'] * mb:.0f} MB), peak per phase: "
                  + ", ".join(f"{k} {(v - b['RssAnon']) * mb:+.1f} MB" for k, v in r["anon_peaks"].items()
                              if k != "start"), flush=True)
    small, big = rows[n], rows[4 * n]
    rss_growth = (big["end"]["VmHWM"] - small["end"]["VmHWM"]) * mb
    anon_growth = (max(big["anon_peaks"].values()) - max(small["anon_peaks"].values())) * mb
    file_growth = (big["end"]["RssFile"] - small["end"]["RssFile"]) * mb
    read_growth = ((big["anon_peaks"].get("read", 0) - big["base"]["RssAnon"])
                   - (small["anon_peaks"].get("read", 0) - small["base"]["RssAnon"])) * mb
    data_growth = 3 * n * 1.2 * int(np.prod(SHAPE)) * 2 / 2 ** 20
    print(f"growth from {n} to {4 * n} images ({data_growth:.0f} MB more features): peak RSS {rss_growth:+.1f} MB, "
          f"peak anonymous {anon_growth:+.1f} MB (target <= 100), file-backed at end {file_growth:+.1f} MB")
    held_growth = ((big["after_read"]["RssAnon"] - big["base"]["RssAnon"])
                   - (small["after_read"]["RssAnon"] - small["base"]["RssAnon"])) * mb
    probe = read_probe
    print(f"anonymous memory held after the read (for the whole trial): {held_growth:+.1f} MB more at {4 * n} "
          f"images; peak while reading {read_growth:+.1f} MB more")
    print(f"where FeatureStore._read_part copies (probe on one {probe['part_mb']:.1f} MB part): "
          + ", ".join(f"{k} {v:+.1f} MB" for k, v in probe.items() if k != "part_mb"))
    if anon_growth > 100:
        print("  -> the trial copies the features out of the memory map: `combine_chunks()` in "
              "trials/store.py FeatureStore._read_part concatenates even a single chunk into the heap (kept for "
              "the trial's life; `column.chunk(0)` when there is one chunk is zero-copy), and the checksum "
              "hashes `features.tobytes()`, a second, transient copy (hashing the array's buffer, e.g. "
              "`memoryview(features)`, does not copy). Labels are copied too (int32 concat, int64 in "
              "HeadTrainer) but that is 12 bytes an image.")
    print(f"rss_growth_mb={rss_growth:.1f} anon_growth_mb={anon_growth:.1f}")


if __name__ == "__main__":
    main()
