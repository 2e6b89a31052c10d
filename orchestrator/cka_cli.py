"""`diffsweep cka`: how alike are the representations of blocks, noise steps and models (linear CKA)?

For each dataset of the sweep spec it makes sure the features of the requested (t, block) grid exist
in the feature store (extracting the missing ones in this process, no Ray), streams them once
through `trials.cka.cka_matrix`, and writes

- `cka_<dataset>_<split>.parquet`: every pair of (model, t, block) feature sets in long format
  (dataset, split, n_images, a, b, t_a, t_b, block_a, block_b, cka);
- heatmaps: `<dataset>_blocks_t<T>.png` (block × block at each t), `<dataset>_t_block<B>.png`
  (t × t per block) and, with --against, `<dataset>_cross_t<T>.png` (this model's blocks × the
  other model's blocks at each t);

then logs them under `cka/` in the sweep's MLflow parent run (or a run "<name>-cka" if no sweep ran).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the imports wait until the command runs: building the CLI parser stays cheap
    import numpy as np

    from orchestrator.config import SweepConfig
    from trials.features import BackboneSpec, DatasetSpec


def add_cka_parser(sub) -> None:
    """Register `diffsweep cka` on the CLI's subparsers."""
    s = sub.add_parser("cka", help="linear CKA between blocks, noise steps and models (Parquet + heatmaps)")
    s.add_argument("space", help="the sweep YAML (its checkpoint, datasets, feature store and MLflow)")
    s.add_argument("--blocks", required=True, help="comma-separated blocks, paper numbering, e.g. 4,8,10")
    s.add_argument("--t", required=True, help="comma-separated noise steps, e.g. 10,100,300")
    s.add_argument("--split", default="val", choices=["train", "val", "test"], help="the split whose features are compared")
    s.add_argument("--against", help="another checkpoint file to compare with, or 'random' (untrained U-Net)")
    s.add_argument("--against-arch", help="architecture of --against (default: the spec's checkpoint.arch)")
    s.add_argument("--limit", type=int, help="at most N images (seeded stratified subset of the split)")
    s.add_argument("--dataset", help="only this dataset of the spec (default: all)")
    s.add_argument("--batch-size", type=int, default=256, help="CKA minibatch size (default 256)")
    s.add_argument("--out", help="output folder (default: <export_dir>/cka)")
    s.set_defaults(func=cka_command)


def _ints(text: str, flag: str) -> list[int]:
    from orchestrator.config import ConfigError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers, e.g. {flag} 4,8,10") from None
    if not values:
        raise ConfigError(f"{flag}: give at least one value")
    return list(dict.fromkeys(values))


def _check_blocks(arch, blocks: list[int], flag: str) -> None:
    from orchestrator.config import ConfigError
    from trials.blocks import num_blocks

    try:
        n = num_blocks(arch)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None
    bad = [b for b in blocks if not 1 <= b <= n]
    if bad:
        raise ConfigError(f"--blocks: {bad} not in 1..{n} for architecture {arch}; see `diffsweep blocks --arch ...`")


def against_spec(cfg: SweepConfig, against: str, arch: str | None) -> BackboneSpec:
    """The other model: a checkpoint file, or 'random' (the same U-Net untrained, seeded like a sweep's baseline)."""
    from orchestrator.config import ConfigError
    from orchestrator.sweep import model_spec

    arch = arch or cfg.checkpoint.arch
    if against == "random":
        return model_spec(cfg, arch, None, "--against")
    path = Path(against).expanduser()
    if not path.is_file():
        raise ConfigError(f"--against: {path} not found; pass a .pt or .safetensors file, or 'random'")
    return model_spec(cfg, arch, path.resolve(), "--against")


def _label(spec: BackboneSpec) -> str:
    return Path(spec.checkpoint).stem if spec.checkpoint else spec.sha256


def cka_request(setup, backbone: BackboneSpec, dataset: DatasetSpec, split: str, ts: list[int], blocks: list[int],
                device: str):
    """The maps CKA compares, computed in this process on `device` (its numeric path is in the keys)."""
    from trials.features import FeatureRequest, numeric_path

    return FeatureRequest(backbone, dataset, split, tuple(ts), tuple(blocks), setup.noise_seed, setup.max_spatial,
                          numeric_path(device))


def _log_to_mlflow(cfg: SweepConfig, files: list[Path], params: dict) -> str:
    """Artifacts go under `cka/` of the sweep's parent run; without a sweep, into a run '<name>-cka'."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep import STATE_FILE, sweep_dir

    client = MlflowClient(cfg.tracking.uri)
    state = sweep_dir(cfg) / STATE_FILE
    run_id, created = None, False
    if state.is_file():
        run_id = json.loads(state.read_text()).get("parent_run_id")
        try:
            client.get_run(run_id)
        except Exception:  # noqa: BLE001 - the sweep logged elsewhere (another tracking URI): start our own run
            run_id = None
    if run_id is None:
        exp = client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
        run_id = client.create_run(exp_id, run_name=f"{cfg.name}-cka", tags={
            "diffsweep.sweep": cfg.name, "diffsweep.role": "cka"}).info.run_id
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        created = True
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path="cka")
    if created:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def _print_matrix(title: str, matrix: np.ndarray, rows: list[str], cols: list[str]) -> None:
    width = max(6, *(len(c) for c in cols)) + 1
    print(title)
    print(" " * 12 + "".join(c.rjust(width) for c in cols))
    for name, row in zip(rows, matrix):
        print(name.ljust(12) + "".join(f"{v:.3f}".rjust(width) for v in row))


def cka_command(args: argparse.Namespace) -> int:
    import matplotlib
    import numpy as np
    import pandas as pd

    from orchestrator.config import ConfigError, load_config
    from orchestrator.plots import matrix_heatmap
    from orchestrator.sweep import trial_setup
    from orchestrator.tracking import check_reachable
    from trials.cka import cka_matrix, default_device
    from trials.diffusion import NUM_TIMESTEPS
    from trials.features import DatasetSpec, fill_request, load_backbone
    from trials.store import FeatureStore

    cfg = load_config(args.space)
    blocks, ts = _ints(args.blocks, "--blocks"), _ints(args.t, "--t")
    bad_t = [t for t in ts if not 0 <= t < NUM_TIMESTEPS]
    if bad_t:
        raise ConfigError(f"--t: {bad_t} outside the schedule; use 0..{NUM_TIMESTEPS - 1}")
    _check_blocks(cfg.checkpoint.arch, blocks, "checkpoint.arch")
    if args.limit is not None and args.limit < 4:
        raise ConfigError(f"--limit {args.limit}: CKA needs at least 4 images")
    if args.batch_size < 4:
        raise ConfigError(f"--batch-size {args.batch_size}: the unbiased HSIC needs minibatches of at least 4")
    check_reachable(cfg.tracking.uri)

    setup = trial_setup(cfg)
    models = [setup.backbone]
    if args.against:
        _check_blocks(args.against_arch or cfg.checkpoint.arch, blocks, "--against-arch")
        models.append(against_spec(cfg, args.against, args.against_arch))
    labels = [_label(m) for m in models]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels[1] += " (against)"
    for m in models:  # a bad checkpoint fails here, before anything is written
        load_backbone(m, default_device())
    datasets = setup.datasets
    if args.dataset:
        if args.dataset not in datasets:
            raise ConfigError(f"--dataset {args.dataset}: not in the spec; use one of {', '.join(datasets)}")
        datasets = {args.dataset: datasets[args.dataset]}
    if args.limit is not None:  # a seeded stratified subset, exactly like `limit` in the YAML
        limited = {}
        for name, spec in datasets.items():
            limits = dict(spec.limits)
            limits[args.split] = min(args.limit, limits.get(args.split) or args.limit)
            limited[name] = DatasetSpec(spec.name, spec.root, spec.val_fraction, tuple(sorted(limits.items())),
                                        spec.skip_corrupt, spec.options, spec.seed)
        datasets = limited

    out = Path(args.out) if args.out else Path(cfg.export_dir) / "cka"
    out.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(setup.store_root)
    files: list[Path] = []
    for name, dataset in datasets.items():
        requests = [cka_request(setup, m, dataset, args.split, ts, blocks, default_device()) for m in models]
        for m, request in zip(models, requests):
            n_new = len(fill_request(request, setup.fill, device=default_device()).keys)
            if n_new:
                print(f"feature store: {n_new} new key(s) for {name}/{args.split} ({_label(m)})", flush=True)
        grid = [(i, t, b) for i in range(len(models)) for t in ts for b in blocks]
        sets = [store.read(requests[i].key(t, b)) for i, t, b in grid]
        if any(s.image_ids != sets[0].image_ids for s in sets):
            raise RuntimeError(f"{name}/{args.split}: stored feature sets list different images; "
                               "re-extract them (delete the store folder)")
        n = len(sets[0])
        matrix = cka_matrix(sets, batch_size=args.batch_size, seed=cfg.seed)
        at = {key: k for k, key in enumerate(grid)}
        table = pd.DataFrame([{"dataset": name, "split": args.split, "n_images": n, "a": labels[ka[0]],
                               "b": labels[kb[0]], "t_a": ka[1], "t_b": kb[1], "block_a": ka[2],
                               "block_b": kb[2], "cka": float(matrix[i, j])}
                              for i, ka in enumerate(grid) for j, kb in enumerate(grid)])
        files.append(out / f"cka_{name}_{args.split}.parquet")
        table.to_parquet(files[-1], index=False)

        def sub(ia: int, ib: int, pairs_a: list, pairs_b: list) -> np.ndarray:
            return np.array([[matrix[at[(ia, *pa)], at[(ib, *pb)]] for pb in pairs_b] for pa in pairs_a])

        where = f"{name}/{args.split}, {n} images"
        block_names, t_names = [f"b{b}" for b in blocks], [f"t={t}" for t in ts]
        at_t = {t: [(t, b) for b in blocks] for t in ts}
        at_b = {b: [(t, b) for t in ts] for b in blocks}
        panels = [(f"{name}_blocks_t{t}.png", [f"block × block at t={t}"], sub(0, 0, at_t[t], at_t[t]),
                   block_names, block_names) for t in ts]
        panels += [(f"{name}_t_block{b}.png", [f"t × t at block {b}"], sub(0, 0, at_b[b], at_b[b]), t_names, t_names)
                   for b in blocks]
        if len(models) == 2:
            panels += [(f"{name}_cross_t{t}.png", [f"at t={t}, rows: {labels[0]}", f"× cols: {labels[1]}"],
                        sub(0, 1, at_t[t], at_t[t]), block_names, block_names) for t in ts]
        for filename, title, values, rows, cols in panels:
            _print_matrix(f"CKA {' '.join(title)} ({where})", values, rows, cols)
            with matplotlib.rc_context({"axes.titlesize": 7}):  # small matrices make narrow figures
                files.append(matrix_heatmap(values, rows, out / filename, "\n".join(["CKA", *title, where]), cols))

    params = {"blocks": ",".join(map(str, blocks)), "t": ",".join(map(str, ts)), "split": args.split,
              "limit": args.limit, "against": args.against, "batch_size": args.batch_size, "models": " | ".join(labels)}
    run_id = _log_to_mlflow(cfg, files, params)
    print(f"CKA: {len(files)} file(s) in {out}; logged under cka/ in MLflow run {run_id} ({cfg.tracking.uri})")
    return 0
