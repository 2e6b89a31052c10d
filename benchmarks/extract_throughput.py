"""Feature-extraction throughput: the paper's full forward + hook vs diffsweep's early-exit capture.

Measured in one run, on the same noisy inputs x_t (built once, outside the timing):

(a) reference, as the paper's code does it: the whole U-Net forward (on CUDA with fp16
    convolutions, as guided-diffusion's `use_fp16` converts them; on CPU fp32), the feature
    taken by a forward hook on the block's module (`output_blocks.4` for block 24 of adm-256-uncond),
    then copied to the host.
(b) diffsweep: `trials.extract.capture_blocks` (stops after the deepest requested block, no output
    head), on CUDA under bf16 autocast with channels_last weights and inputs and cuDNN autotune, optionally
    `torch.compile`d (`--compile`), pooled on the device to at most `--max-spatial`, cast to fp16 on
    the device and copied to the host.

Both end with the feature on the host as fp16, so both pay the same transfer. It prints images/s,
the ratio (b)/(a), peak GPU memory per path on CUDA, and how close (b)'s features are to (a)'s. It
also measures multi-block capture (blocks 19, 24, 30 in one pass) against block 30 alone: one pass
for several blocks should cost what the deepest one costs.

(b) is `trials.extract.DeviceCapture`, the same object the store fill (`trials.features.extract_batch`)
uses, so the figure is what a sweep gets. The multi-block comparison runs eager: each compiled
variant is another graph to compile (~45 s each on adm-256-uncond).

--end-to-end adds what users pay for: images/s of the store fill itself (`trials.features.fill_request`:
decode, seeded noise, forward, pool, write, with its prefetch and writer threads and the process's
cached, optionally compiled extractor; the compile is paid in a warm-up fill of other images and
reported) against the paper's path on the same images (decode on the critical path, fresh
`torch.randn_like` noise, the full forward with a hook, the feature copied to the host), with the
busy seconds of each stage. On a CPU whose default arithmetic is bf16 (`numeric_path`: AVX512-BF16
or AMX units) the fp32 fill is timed too, against the same baseline (`ratio_fp32` in the last line).
Its ratio is the last line; on CUDA also `flop_fraction`: the FLOPs of the truncated network
(torch.utils.flop_counter) times the compiled forward's images/s over the device's dense bf16 peak.
Images: Fashion-MNIST (the quickstart's, `--cpu-small`), an ImageNet-style `--root`, or else synthetic JPEGs written to a temp folder (`--jpegs`, 500x375, decoded and resized like photos).

--cpu-small (the default without CUDA) runs a small architecture (adm-28-small: blocks 10 for 24,
and 7, 10, 12 for 19, 24, 30) with batch 16 for a few iterations on the CPU, in a few seconds. The
>= 8x target is for adm-256-uncond on an H100.

    .venv/bin/python benchmarks/extract_throughput.py --cpu-small
    python benchmarks/extract_throughput.py --batch 64 --compile            # on a GPU machine
    python benchmarks/extract_throughput.py --checkpoint 256x256_diffusion_uncond.pt
    .venv/bin/python benchmarks/extract_throughput.py --end-to-end --cpu-small
    .venv/bin/python benchmarks/extract_throughput.py --end-to-end --cpu-small --numeric cpu-bf16
    python benchmarks/extract_throughput.py --end-to-end --batch 64 --compile   # on a GPU machine
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()


def sync(device: str) -> None:
    if device == "cuda" and CUDA:
        torch.cuda.synchronize()


def reset_peak(device: str) -> int:
    if device == "cuda" and CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" and CUDA else None


def timed(fn, inputs, warmup: int, iters: int, device: str) -> tuple[float, float, torch.Tensor]:
    """(images/s, seconds of the first warm-up call, last output)."""
    t0 = time.perf_counter()
    out = fn(*inputs[0])
    sync(device)
    first = time.perf_counter() - t0
    for i in range(1, warmup):
        out = fn(*inputs[i % len(inputs)])
    sync(device)
    t0 = time.perf_counter()
    for i in range(iters):
        out = fn(*inputs[i % len(inputs)])
    sync(device)
    seconds = time.perf_counter() - t0
    return iters * inputs[0][0].shape[0] / seconds, first, out


def module_of(model, block: int):
    from trials.blocks import block_table
    return model.get_submodule(block_table(model)[block - 1].module)


def reference_path(model, block: int, device: str, dtype: torch.dtype | None = None):
    """The paper's way: full forward, a forward hook grabs the block's output. On CUDA the weights
    are fp16 as guided-diffusion's `use_fp16` makes them: convolutions in fp16, the time-embedding
    linears and the GroupNorms (computed in fp32) left in fp32, the input cast to fp16."""
    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    ref = copy.deepcopy(model).to(device).eval()
    for m in ref.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
            m.to(dtype)
    grabbed = {}
    module_of(ref, block).register_forward_hook(lambda m, i, o: grabbed.__setitem__("h", o))

    @torch.no_grad()
    def run(x, t, y):
        ref(x.to(dtype), t, y)
        return grabbed.pop("h").to(torch.float16).cpu()
    return ref, run


def diffsweep_path(model, blocks: list[int], device: str, max_spatial: int, compile_: bool | str):
    """trials.extract.DeviceCapture, the path the store fill uses: early exit, bf16 autocast +
    channels_last on CUDA, pooling and the fp16 cast on the device."""
    from trials.extract import cached_capture

    # the process-wide cache the store fill uses: with --end-to-end the fill reuses this compile
    return cached_capture(model.to(device), blocks, pool=max_spatial, compile=compile_, rows=rows_of(compile_))


_ROWS: dict[str, int] = {}


def rows_of(compile_) -> int | None:
    return _ROWS.get("rows") if compile_ else None


# dense bf16 tensor-core peaks (no sparsity), by device name
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def truncated_flops(model, block: int, batch: int, device: str, y) -> float:
    """FLOPs per image of the network up to `block` (torch.utils.flop_counter: matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from trials.extract import capture_blocks
    cfg = model.config
    x = torch.zeros(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.full((batch,), 90, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            capture_blocks(model, x, t, [block], y=y)
    return counter.get_total_flops() / batch


def synthetic_jpegs(root: Path, n: int) -> Path:
    """An ImageNet-style folder of n smooth 500x375 JPEGs (train) and a few more (val)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", max(8, n // 8))):
        for i in range(count):
            d = root / split / f"c{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            base = rng.random((3, 12, 16)).astype(np.float32)
            img = np.kron(base, np.ones((1, 32, 32), np.float32))[:, :375, :500]
            img = (img * 200 + rng.random(img.shape) * 55).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)
            Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=90)
    return root


def end_to_end(args, bb, model, block: int, device: str, batch: int, fwd_ips: float | None) -> str:
    """The store fill against the paper's path on the same images; returns the last line."""
    import torch.nn.functional as F  # noqa: F401

    from trials.datasets.preprocess import iter_batches
    from trials.diffusion import q_sample
    from trials.features import DatasetSpec, FillOptions, fill_request

    if args.cpu_small or device == "cpu":
        spec = DatasetSpec("fashion_mnist", args.root, 0.1, (("test", batch), ("train", args.images)), seed=0)
        split, warm_split = "train", "test"
    else:
        root = args.root or str(synthetic_jpegs(Path(tempfile.mkdtemp(prefix="e2e-jpegs-")), args.images))
        spec = DatasetSpec("imagefolder", root, 0.01, (("test", batch), ("train", args.images)), seed=0)
        split, warm_split = "train", "test"
    req = common.request(bb, spec, split, (args.t,), (block,), args.max_spatial, numeric=args.numeric)
    samples = req.samples()
    n = len(samples)
    cfg = model.config

    def timed_fill(numeric: str | None):
        """A warm-up fill of other images (builds, and compiles, this worker's extractor once), then the
        timed fill of `split` into an empty store: (its FillStats, the warm-up's seconds)."""
        with tempfile.TemporaryDirectory(prefix="e2e-store-") as store:
            options = FillOptions(store, batch_size=batch, compile=bool(args.compile))
            t0 = time.perf_counter()
            fill_request(common.request(bb, spec, warm_split, (args.t,), (block,), args.max_spatial, numeric=numeric),
                         options, device=device)
            warm_s = time.perf_counter() - t0
            return fill_request(common.request(bb, spec, split, (args.t,), (block,), args.max_spatial,
                                               numeric=numeric), options, device=device), warm_s

    stats, warm = timed_fill(args.numeric)
    ours = stats.images / stats.seconds
    fp32 = None
    if device == "cpu" and req.numeric != "cpu-fp32":  # the default arithmetic is bf16 here: fp32 beside it
        fp32, _ = timed_fill("cpu-fp32")

    # the paper's path: decode, fresh noise, full forward + hook, feature to the host; one batch at a time
    ref, run_ref = reference_path(model, block, device)
    y_of = (lambda k: torch.zeros(k, dtype=torch.long, device=device)) if cfg.class_cond else (lambda k: None)
    stages = {"decode": 0.0, "noise": 0.0, "forward": 0.0}
    for warm_pass in (True, False):
        t_all = time.perf_counter()
        images = 0
        since = time.perf_counter()
        for x, chunk in iter_batches(samples[:batch] if warm_pass else samples, cfg.image_size, cfg.in_channels,
                                     batch):
            x = torch.from_numpy(x).to(device)
            sync(device)
            now = time.perf_counter()
            stages["decode"] += 0 if warm_pass else now - since
            since = now
            xt = q_sample(x, args.t, torch.randn_like(x))
            sync(device)
            now = time.perf_counter()
            stages["noise"] += 0 if warm_pass else now - since
            since = now
            run_ref(xt, torch.full((x.shape[0],), args.t, dtype=torch.long, device=device), y_of(x.shape[0]))
            now = time.perf_counter()
            stages["forward"] += 0 if warm_pass else now - since
            since = now
            images += x.shape[0]
        paper_seconds = time.perf_counter() - t_all
    del ref, run_ref
    paper = images / paper_seconds

    def shares(d: dict, wall: float) -> str:
        return ", ".join(f"{k} {v:.2f}s ({100 * v / wall:.0f}%)" for k, v in d.items())
    print(f"end to end, {n} images ({spec.name} {split}), block {block}, t={args.t}, batch {batch}, "
          f"store fill numeric path {req.numeric}:")
    print(f"(a) paper's path (decode, fresh noise, full forward + hook, to host): {paper:9.1f} images/s, "
          f"{paper_seconds:.2f}s; stages: {shares(stages, paper_seconds)}")
    print(f"(b) store fill (fill_request: decode + noise ahead in a thread, forward, pool, fp16, write behind): "
          f"{ours:9.1f} images/s, {stats.seconds:.2f}s (after a {warm:.1f}s warm-up fill"
          f"{' incl. compile' if args.compile else ''}); busy seconds per stage (overlapping): "
          f"{shares(stats.stages, stats.seconds)}")
    ratio = ours / paper
    line = f"ratio={ratio:.2f}"
    if fp32 is not None:
        fp32_ips = fp32.images / fp32.seconds
        print(f"(c) the same store fill in fp32 (store.numeric: cpu-fp32): {fp32_ips:9.1f} images/s, "
              f"{fp32.seconds:.2f}s: {fp32_ips / paper:.2f}x the paper's path")
        line += f" ratio_fp32={fp32_ips / paper:.2f}"
    if device == "cuda":
        flops = truncated_flops(model, block, batch, device, y_of(batch))
        peak = args.peak_tflops or peak_tflops(torch.cuda.get_device_name())
        if fwd_ips is not None and peak:
            fraction = flops * fwd_ips / (peak * 1e12)
            print(f"truncated network (to block {block}): {flops / 1e9:.1f} GFLOP per image; the compiled forward at "
                  f"{fwd_ips:.1f} images/s = {flops * fwd_ips / 1e12:.1f} TFLOP/s of {peak:.0f} (dense bf16 peak)")
            line += f" flop_fraction={fraction:.3f}"
    else:
        flops = truncated_flops(model, block, 1, device, y_of(1))
        print(f"truncated network (to block {block}): {flops / 1e6:.1f} MFLOP per image")
    print(f"store fill / paper's path, end to end: {ratio:.2f}x")
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-small", action="store_true",
                    help="small architecture on the CPU, batch 16, a few iterations (default without CUDA)")
    ap.add_argument("--arch", default=None, help="default adm-256-uncond (GPU) / adm-28-small (--cpu-small)")
    ap.add_argument("--checkpoint", default=None, help="weights file (e.g. 256x256_diffusion_uncond.pt); "
                                                        "default random weights (seeded)")
    ap.add_argument("--block", type=int, default=None, help="block to extract (default 24; small: 10)")
    ap.add_argument("--multi", default=None, help="blocks captured in one pass (default 19,24,30; small: 7,10,12)")
    ap.add_argument("--t", type=int, default=90, help="noise step (default 90)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 64 on GPU, 16 on CPU)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 GPU, 4 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 3 GPU, 1 CPU)")
    ap.add_argument("--max-spatial", type=int, default=16, help="pool maps to at most this side (store default)")
    ap.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                    help="torch.compile the capture, optionally with a mode (reduce-overhead = CUDA graphs); "
                         "the warm-up includes the compile")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU mode default 1)")
    ap.add_argument("--numeric", default=None, choices=("cpu-fp32", "cpu-bf16", "cuda-bf16"),
                    help="--end-to-end: the store fill's numeric path (store.numeric; default this device's: "
                         "cuda-bf16; on a CPU cpu-bf16 where it has bf16 units, else cpu-fp32); the paper's "
                         "path stays fp32 on a CPU")
    ap.add_argument("--end-to-end", action="store_true",
                    help="also time the store fill itself against the paper's path on the same images")
    ap.add_argument("--images", type=int, default=None, help="--end-to-end: images (default 2048 CPU, 2048 GPU)")
    ap.add_argument("--root", default=None, help="--end-to-end: dataset root (fashion-mnist on the CPU; an "
                                                  "ImageNet-style folder on a GPU, default synthetic JPEGs)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default by name)")
    args = ap.parse_args()

    small = args.cpu_small or not CUDA
    device = "cpu" if small else "cuda"
    arch = args.arch or ("adm-28-small" if small else "adm-256-uncond")
    block = args.block or (10 if small else 24)
    multi = [int(b) for b in (args.multi or ("7,10,12" if small else "19,24,30")).split(",")]
    batch = args.batch or ((128 if args.end_to_end else 16) if small else 64)
    args.images = args.images or 2048
    _ROWS["rows"] = batch
    iters = args.iters or (4 if small else 20)
    warmup = args.warmup or (1 if small else 3)
    if device == "cpu":
        common.set_threads(args.threads or 1)

    from trials.diffusion import q_sample
    from trials.unet import create_unet, load_checkpoint

    torch.manual_seed(0)
    bb = None
    if args.end_to_end:  # the fill's own model object, so the forward-only figures share its extractor
        from trials.features import load_backbone
        bb = (common.backbone(arch, args.checkpoint) if (args.checkpoint or arch == "adm-28-small")
              else common.backbone(arch, random_weights=True))
        model = load_backbone(bb, device)
    else:
        model = (load_checkpoint(args.checkpoint, arch) if args.checkpoint else create_unet(arch)).eval()
    model.requires_grad_(False)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    weights = ("the shipped checkpoint's" if bb is not None and bb.checkpoint and not args.checkpoint
               else "checkpoint" if args.checkpoint else "random")
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"extract_throughput: {arch} ({n_params:.0f}M params, {weights} "
          f"weights), block {block}, t={args.t}, batch {batch}, {iters} timed iterations after {warmup} warm-up, "
          f"device {gpu}, compile={args.compile}", flush=True)

    gen = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(2):
        x0 = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
        xt = q_sample(x0, args.t, torch.randn(x0.shape, generator=gen)).to(device)
        t = torch.full((batch,), args.t, dtype=torch.long, device=device)
        y = torch.randint(0, cfg.num_classes, (batch,), generator=gen).to(device) if cfg.class_cond else None
        inputs.append((xt, t, y))

    # (a) reference: full forward + hook (its own fp16 copy of the weights on CUDA)
    reset_peak(device)
    ref, run_ref = reference_path(model, block, device)
    ref_ips, _, ref_out = timed(run_ref, inputs, warmup, iters, device)
    ref_mem = peak_mb(device)
    del ref, run_ref
    # (b) diffsweep: early-exit capture (fp32 weights + bf16 autocast on CUDA)
    reset_peak(device)
    run_ds = diffsweep_path(model, [block], device, args.max_spatial, args.compile)
    ds_ips, ds_first, ds_out = timed(run_ds, inputs, warmup, iters, device)
    ds_mem = peak_mb(device)
    ds_map = ds_out[block]

    ref_map = ref_out.float()
    if ref_map.shape[-1] > args.max_spatial:
        ref_map = F.adaptive_avg_pool2d(ref_map, args.max_spatial)
    cos = F.cosine_similarity(ref_map.flatten(1), ds_map.float().flatten(1), dim=1).min().item()

    def mem(v):
        return f", peak GPU memory {v:.0f} MiB (weights included)" if v is not None else ""
    print(f"(a) reference (full forward, {'fp16' if device == 'cuda' else 'fp32'}, hook): {ref_ips:9.1f} images/s"
          f"{mem(ref_mem)}")
    print(f"(b) diffsweep (capture_blocks{', bf16 autocast, channels_last, cuDNN autotune' if device == 'cuda' else ', fp32'}"
          f"{', compiled' if args.compile else ''}): {ds_ips:9.1f} images/s{mem(ds_mem)}"
          + (f" (first call incl. compile {ds_first:.1f}s)" if args.compile else ""))
    print(f"    features of (b) vs (a): min cosine similarity over the batch {cos:.4f}, shape {tuple(ds_map.shape)}")

    if args.compile:  # what the compile buys: the same path in eager mode
        eager_ips, _, _ = timed(diffsweep_path(model, [block], device, args.max_spatial, False), inputs, warmup,
                                iters, device)
        print(f"    (b) in eager mode: {eager_ips:9.1f} images/s -> torch.compile gives {ds_ips / eager_ips:.2f}x")

    # multi-block capture vs the deepest block alone, both eager (each compiled variant is another
    # graph to compile, minutes on the big model; the comparison is the same in either mode)
    deepest = max(multi)
    one_ips, _, _ = timed(diffsweep_path(model, [deepest], device, args.max_spatial, False), inputs, warmup,
                          iters, device)
    multi_ips, _, _ = timed(diffsweep_path(model, multi, device, args.max_spatial, False), inputs, warmup,
                            iters, device)
    print(f"multi-block capture (eager): blocks {','.join(map(str, multi))} in one pass {multi_ips:9.1f} images/s "
          f"vs block {deepest} alone {one_ips:9.1f} images/s -> the extra blocks cost {one_ips / multi_ips:.2f}x "
          f"(one pass; separate passes would cost ~{len(multi)}x)")
    ratio = ds_ips / ref_ips
    target = " (target >= 8x on an H100 for adm-256-uncond)" if not small else " (CPU mode: early exit only)"
    print(f"diffsweep / reference throughput: {ratio:.2f}x{target}")
    if args.end_to_end:
        print(end_to_end(args, bb, model, block, device, batch, ds_ips if (args.compile and device == "cuda") else None))
        return
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
