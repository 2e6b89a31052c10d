"""diffsweep's Python API.

    import diffsweep
    clf = diffsweep.load("exported/fashion_mnist.yaml", device="cpu")  # a torch.nn.Module
    clf.predict(["shoe.png"], batch_size=64)    # [Prediction(image, label, index, top_k, error)]
    logits = clf(images)                        # N×C×H×W uint8 or [-1, 1] float tensor -> logits
    clf.classes, clf.config                     # class names; the exported YAML as a dict
    outcome = diffsweep.run("search_spaces/quickstart.yaml")
    outcome.selected, outcome.results           # per-dataset winner; one row per trial (DataFrame)

Importing this package is cheap: torch, Ray and MLflow are imported by the calls that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.classifier import Classifier, Prediction
    from orchestrator.config import SweepConfig
    from orchestrator.sweep import SweepOutcome

__all__ = ["Classifier", "Prediction", "load", "run"]


def load(path: str | Path, device: str = "cpu", match_dataset: bool = True) -> "Classifier":
    """The selection exported to `path` (`<export_dir>/<dataset>.yaml`) as a `torch.nn.Module` on
    `device`: preprocessing, seeded noising, the early-exit U-Net and the trained head.

    `match_dataset=False` skips looking the image up in the export's dataset for its noise id (see
    `orchestrator.classifier`), for machines without the dataset or when speed matters more."""
    from orchestrator.classifier import load as _load

    return _load(path, device=device, match_dataset=match_dataset)


def run(config: "str | Path | dict[str, Any] | SweepConfig", *, address: str | None = None,
        overwrite: bool = False, register_model: str | None = None, **overrides: Any) -> "SweepOutcome":
    """Run a sweep from a YAML path, a dict with the YAML's content, or a `SweepConfig`; returns its
    outcome: `.selected` ({dataset: head, t, block, pool, members, val_acc, test_acc, yaml, weights}; an
    ensemble's head is "ensemble of k", its t / block / pool None, `members` what each member reads),
    `.results` (one row per trial), `.parent_run_id`, `.export_dir`, `.below_bar` (selections short of
    `selection.min_val_acc`: reported, neither tested nor exported). Each winner is also an MLflow
    model, `selected[dataset]["model_uri"]` (`runs:/<parent_run_id>/<dataset>`); `register_model`
    registers it as that name (one dataset) or `<name>-<dataset>`.

    Keyword overrides use the YAML's dotted keys with `__` for the dot, e.g.
    `run("space.yaml", search__num_samples=4, tracking__uri="sqlite:///x.db")`."""
    from orchestrator.config import SweepConfig, load_config, parse_config
    from orchestrator.sweep import run_sweep

    dotted = {k.replace("__", "."): v for k, v in overrides.items()}
    if isinstance(config, SweepConfig):
        # parsed again even without overrides: a model built in Python skipped the checks that need the
        # architecture (check_blocks), which parse_config runs
        cfg = parse_config(config.model_dump(mode="json"), "SweepConfig", dotted)
    elif isinstance(config, dict):
        cfg = parse_config(config, "config dict", dotted)
    else:
        cfg = load_config(config, dotted)
    from orchestrator.rerun import check_new_sweep
    check_new_sweep(cfg, overwrite=overwrite, how="pass overwrite=True")
    return run_sweep(cfg, address=address, register_model=register_model)


def __getattr__(name: str):
    if name in ("Classifier", "Prediction"):
        from orchestrator import classifier
        return getattr(classifier, name)
    raise AttributeError(f"module 'diffsweep' has no attribute {name!r}")
