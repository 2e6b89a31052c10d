"""The pictures users look at: validation accuracy over (t, block), and CKA matrices."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no screen on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from trials.head_registry import REGISTRY  # noqa: E402


def _finish(fig, ax, im, title: str, path: Path) -> Path:
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def accuracy_grid(rows: pd.DataFrame) -> pd.DataFrame:
    """Best validation accuracy of any trial at each (t, block) cell (t rows, block columns). Trials
    of heads that read several maps (concat, fusion, mixing) belong to no one cell and are left out."""
    rows = rows.dropna(subset=["t", "block"])
    if "head" in rows:
        rows = rows[~rows["head"].map(lambda h: REGISTRY[h].multi_map).astype(bool)]
    acc = rows.get("best_val_acc", rows["val_acc"]).astype(float)
    return rows.assign(acc=acc).pivot_table(index="t", columns="block", values="acc", aggfunc="max")


def weights_grid(map_weights: list) -> pd.DataFrame:
    """A mixing head's [[t, block, weight], ...] as a t × block table."""
    frame = pd.DataFrame(map_weights, columns=["t", "block", "weight"])
    return frame.pivot_table(index="t", columns="block", values="weight", aggfunc="sum")


def accuracy_heatmap(rows: pd.DataFrame, path: Path, title: str = "best val_acc") -> Path:
    """Best validation accuracy of any single-map trial at each (t, block) cell; blank where none ran."""
    return grid_heatmap(accuracy_grid(rows), path, title)


def weights_heatmap(map_weights: list, path: Path, title: str = "mixing weights") -> Path:
    """The learned softmax weight of each (t, block) map of a mixing head, in percent."""
    return grid_heatmap(weights_grid(map_weights), path, title)


def grid_heatmap(grid: pd.DataFrame, path: Path, title: str) -> Path:
    """A t × block table as a heatmap, each cell written in percent; blank cells are NaN."""
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * max(len(grid.columns), 2), 1.0 + 0.5 * max(len(grid.index), 2)))
    with warnings.catch_warnings():  # a single row or column is a fine heatmap
        warnings.simplefilter("ignore", UserWarning)
        im = ax.imshow(grid.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(grid.columns)), [str(int(c)) for c in grid.columns])
    ax.set_yticks(range(len(grid.index)), [str(int(i)) for i in grid.index])
    ax.set_xlabel("block (paper numbering)")
    ax.set_ylabel("noise step t")
    for (i, j), v in np.ndenumerate(grid.values):
        if not np.isnan(v):
            ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", color="w", fontsize=8)
    return _finish(fig, ax, im, title, path)


def matrix_heatmap(matrix: np.ndarray, labels: list[str], path: Path, title: str, cols: list[str] | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(cols or labels), 1.2 + 0.45 * len(labels)))
    im = ax.imshow(matrix, cmap="magma", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols or labels)), cols or labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    return _finish(fig, ax, im, title, path)
