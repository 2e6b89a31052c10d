"""`diffsweep` command line. Every expected failure ends as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _overrides(args) -> dict:
    out = {}
    for flag, key in (("tracking_uri", "tracking.uri"), ("storage_path", "storage_path"),
                      ("num_samples", "search.num_samples"), ("seed", "seed"), ("export_dir", "export_dir"),
                      ("store", "store.path"), ("name", "name")):
        value = getattr(args, flag, None)
        if value is not None:
            out[key] = value
    return out


def cmd_run(args) -> int:
    from orchestrator.config import load_config
    from orchestrator.rerun import check_new_sweep

    cfg = load_config(args.space, _overrides(args))  # before torch and Ray: a bad YAML is refused at once
    check_new_sweep(cfg, overwrite=args.overwrite)
    from orchestrator.report import print_summary
    from orchestrator.sweep import run_sweep

    outcome = run_sweep(cfg, address=args.address, register_model=args.register_model)
    return print_summary(cfg, outcome)


def cmd_plan(args) -> int:
    from orchestrator.config import load_config

    cfg = load_config(args.space, _overrides(args))
    from orchestrator.plan import format_plan, sweep_plan

    path = cfg.checkpoint_path()
    if args.published_sizes and path is not None and not path.is_file():
        # the plan needs only the architecture; random weights of it have the same shapes and speed
        print(f"note: checkpoint {path} is not on this machine; planning with random weights of "
              f"{cfg.checkpoint.arch}", file=sys.stderr)
        cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"random_weights": True})})
    plan = sweep_plan(cfg, measure=args.measure, throughput=args.throughput, published=args.published_sizes)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0


def cmd_resume(args) -> int:
    from orchestrator.config import ConfigError, SweepConfig
    from orchestrator.report import print_summary
    from orchestrator.sweep import STATE_FILE, absolute, check_resumable, run_sweep

    state_path = Path(absolute(args.storage_path)) / args.name / STATE_FILE
    if not state_path.is_file():
        raise ConfigError(f"sweep '{args.name}': no saved sweep at {state_path.parent}; check the name and "
                          "--storage-path")
    cfg = SweepConfig.model_validate(json.loads(state_path.read_text())["config"])
    check_resumable(state_path.parent)
    outcome = run_sweep(cfg, address=args.address, resume=True)
    return print_summary(cfg, outcome)


def cmd_status(args) -> int:
    from orchestrator.report import sweep_status

    print(sweep_status(args.name, args.storage_path, as_json=args.json))
    return 0


def cmd_extract(args) -> int:
    from orchestrator.config import load_config

    cfg = load_config(args.space, _overrides(args))
    from orchestrator.sweep import fill_store, init_ray, trial_setup, check_datasets

    check_datasets(cfg)
    setup = trial_setup(cfg)
    init_ray(args.address)
    fill_store(cfg, setup, tuple(args.splits.split(",")))
    return 0


def cmd_evaluate(args) -> int:
    from orchestrator.predict import evaluate

    print(json.dumps(evaluate(args.config, args.split, batch_size=args.batch_size, device=args.device)))
    return 0


def cmd_predict(args) -> int:
    from orchestrator.predict import predict

    preds = predict(args.config, args.images, batch_size=args.batch_size, device=args.device, top_k=args.top_k)
    if args.json:
        print(json.dumps([p.as_dict() for p in preds], indent=1))
    for p in preds:  # a bad image is one line of its own; the others are labelled all the same
        if p.error is not None:
            print(f"diffsweep: error: {p.error}", file=sys.stderr)
        elif not args.json:
            extra = "".join(f"\t{c} {prob:.4f}" for c, prob in p.top_k) if args.top_k > 1 else ""
            print(f"{p.image}\t{p.label}{extra}")
    return 2 if any(p.error is not None for p in preds) else 0


def cmd_blocks(args) -> int:
    from orchestrator.blocks_cli import blocks_command

    try:
        print(blocks_command(args.arch, args.json, args.max_spatial))
    except ValueError as e:
        from orchestrator.config import ConfigError
        raise ConfigError(f"--arch: {e}") from None
    return 0


def cmd_datasets(args) -> int:
    from trials.datasets import load_dataset

    data = load_dataset(args.name, args.root)
    print(json.dumps({"name": args.name, "num_classes": data.num_classes, "splits": data.counts()}))
    return 0


def cmd_train_ddpm(args) -> int:
    from trials.ddpm import DDPMTrainConfig, train_ddpm

    cfg = DDPMTrainConfig(dataset=args.dataset, arch=args.arch, out=args.out, root=args.root, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed, save_every=args.save_every,
                          compile=args.compile, bf16=args.bf16, max_minutes=args.max_minutes,
                          init_from=args.init_from,
                          **({"samples": args.samples} if args.samples is not None else {}))
    out = train_ddpm(cfg)
    print(f"checkpoint: {out}  (sidecar {Path(out).with_suffix('.json')})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffsweep", description="Sweep diffusion U-Net features for classification.")
    sub = p.add_subparsers(dest="command", required=True)

    def sweep_flags(s):
        s.add_argument("--address", help="Ray cluster address ('auto' on a cluster node, 'local' for a private "
                                         "instance); default: the cluster `ray start` made on this machine, else "
                                         "a local Ray")
        s.add_argument("--tracking-uri", help="MLflow tracking URI (default from the YAML: sqlite:///mlruns.db)")
        s.add_argument("--storage-path", help="Ray Tune storage path (shared storage on a cluster)")
        s.add_argument("--store", help="feature store path or URI")
        s.add_argument("--num-samples", type=int, help="trials per dataset")
        s.add_argument("--seed", type=int, help="the sweep's seed (splits, samplers, noise); default from the YAML")
        s.add_argument("--export-dir", help="where the selected configs are exported (default: exported)")
        s.add_argument("--name", help="the sweep's name (default: `name:` in the YAML)")

    s = sub.add_parser("run", help="run a sweep from a YAML search space")
    s.add_argument("space", help="the sweep's YAML search space, e.g. search_spaces/quickstart.yaml")
    sweep_flags(s)
    s.add_argument("--overwrite", action="store_true",
                   help="replace an earlier sweep of the same name (its Tune state; MLflow runs are kept)")
    s.add_argument("--register-model", metavar="NAME",
                   help="also register each winner's MLflow model: as NAME (one dataset) or NAME-<dataset>")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("plan", help="what a sweep will cost (images, passes, bytes, trials, time, RAM) before it runs")
    s.add_argument("space", help="the sweep's YAML search space")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.add_argument("--measure", type=int, default=0, metavar="N",
                   help="time N images of the real model on this machine to estimate extraction time")
    s.add_argument("--throughput", type=float, metavar="IMG_S",
                   help="estimate extraction time at this many images/s (instead of --measure)")
    s.add_argument("--store", help="feature store path or URI")
    s.add_argument("--published-sizes", action="store_true",
                   help="size datasets whose files are not on this machine from their archives' published "
                        "split sizes (plan before the data is copied)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("resume", help="continue an interrupted sweep")
    s.add_argument("name", help="the sweep's name (`name:` in its YAML)")
    s.add_argument("--storage-path", default="runs/ray", help="Ray Tune storage path the sweep ran with")
    s.add_argument("--address", help="Ray cluster address ('auto' on a cluster node, 'local' for a private "
                                     "instance); default: the cluster `ray start` made on this machine, else a "
                                     "local Ray")
    s.set_defaults(func=cmd_resume)

    s = sub.add_parser("status", help="list the trials of a sweep")
    s.add_argument("name", help="the sweep's name (`name:` in its YAML)")
    s.add_argument("--storage-path", default="runs/ray", help="Ray Tune storage path the sweep ran with")
    s.add_argument("--json", action="store_true", help="print the trials as JSON")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("extract", help="fill the feature store ahead of a sweep")
    s.add_argument("space", help="the sweep's YAML search space")
    s.add_argument("--splits", default="train,val", help="comma-separated splits to extract (train,val,test)")
    sweep_flags(s)
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("evaluate", help="accuracy of an exported config on a dataset split (JSON)")
    s.add_argument("--config", required=True, help="an exported <dataset>.yaml")
    s.add_argument("--split", default="test", help="train, val or test, as the sweep carved them")
    s.add_argument("--batch-size", type=int, default=256, help="images per U-Net pass")
    s.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("predict", help="label images with an exported config")
    s.add_argument("--config", required=True, help="an exported <dataset>.yaml")
    s.add_argument("images", nargs="+", help="image files; an unreadable one is reported, the rest labelled")
    s.add_argument("--batch-size", type=int, default=64, help="images per U-Net pass")
    s.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    s.add_argument("--top-k", type=int, default=1, help="also print the k most likely classes and their probabilities")
    s.add_argument("--json", action="store_true", help="print a JSON list: image, label, index, top_k (or error)")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("blocks", help="the block table of an architecture (paper numbering)")
    s.add_argument("--arch", required=True, help="architecture name, e.g. adm-28-small or adm-256-uncond")
    s.add_argument("--max-spatial", type=int, default=16,
                   help="the store's spatial cap (store.max_spatial): the side a head sees is min(resolution, this)")
    s.add_argument("--json", action="store_true", help="print the table as JSON")
    s.set_defaults(func=cmd_blocks)

    s = sub.add_parser("datasets", help="dataset tools")
    ds = s.add_subparsers(dest="datasets_command", required=True)
    s = ds.add_parser("inspect", help="class and split counts of a dataset on disk (JSON)")
    s.add_argument("name", help="dataset name (cub, flowers102, ..., fashion_mnist, digits)")
    s.add_argument("--root", help="the dataset's unpacked folder (or its parent); default: the dataset's own")
    s.set_defaults(func=cmd_datasets)

    s = sub.add_parser("train-ddpm", help="train the small DDPM backbone")
    s.add_argument("--dataset", default="fashion_mnist", help="dataset to train on (its train split)")
    s.add_argument("--arch", default="adm-28-small", help="U-Net architecture name")
    s.add_argument("--out", required=True, help="the checkpoint to write (.safetensors; a .json sidecar beside it)")
    s.add_argument("--root", help="the dataset's folder; default: the dataset's own")
    s.add_argument("--steps", type=int, default=2000, help="optimizer steps in all (a resumed run continues to this)")
    s.add_argument("--batch-size", type=int, default=128, help="images per step")
    s.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    s.add_argument("--seed", type=int, default=0, help="seed of the initial weights, batches and noise")
    s.add_argument("--save-every", type=int, default=250, help="write a checkpoint every this many steps")
    s.add_argument("--compile", action="store_true", help="torch.compile the U-Net (pays off on a GPU, and on a CPU with --bf16)")
    s.add_argument("--bf16", action="store_true",
                   help="bf16 autocast on a CPU as well (always on with CUDA); faster on CPUs with AMX or AVX-512 BF16")
    s.add_argument("--max-minutes", type=float,
                   help="stop after this much training time; the sidecar records the steps done")
    s.add_argument("--init-from", help="continue training from this checkpoint's weights (fresh optimizer); "
                                       "the sidecar records it and the steps in total")
    s.add_argument("--samples", type=int,
                   help="images in the DDIM sample grid written beside the final checkpoint (default 64; 0: none)")
    s.set_defaults(func=cmd_train_ddpm)

    from orchestrator.cka_cli import add_cka_parser
    add_cka_parser(sub)
    return p


EXPECTED = (("orchestrator.config", "ConfigError"), ("orchestrator.predict", "ExportError"),
            ("orchestrator.tracking", "TrackingError"), ("trials.datasets.base", "DatasetError"),
            ("trials.unet", "CheckpointError"))


def expected_errors() -> tuple[type[BaseException], ...]:
    """The errors that end as one line. Only modules already imported are looked in (an error of a
    module never imported cannot have been raised), so a refusal does not first import torch/MLflow."""
    found = [getattr(sys.modules[m], name) for m, name in EXPECTED if m in sys.modules]
    return (*found, PermissionError, FileNotFoundError)


def _unwrap(e: BaseException) -> BaseException:
    """Ray wraps worker exceptions (RayTaskError, TuneError); find ours underneath."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, expected_errors()):
            return e
        inner = getattr(e, "cause", None) or e.__cause__ or e.__context__
        if inner is None:
            break
        e = inner
    return e


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        from orchestrator.hints import diffsweep_command
        print(f"diffsweep: interrupted; `{diffsweep_command()} resume NAME` continues a sweep", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, never a traceback from deep inside Ray
        inner = _unwrap(e)
        if isinstance(inner, expected_errors()):
            msg = str(inner).splitlines()[0] if str(inner) else type(inner).__name__
            print(f"diffsweep: error: {msg}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
