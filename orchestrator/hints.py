"""Commands printed for the user to copy, spelled so that they work as printed: `diffsweep` only
when that is the program on PATH, else the script's own path (`.venv/bin/diffsweep`), else
`python -m orchestrator` with this interpreter."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path


def _short(path: Path) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if not rel.startswith("..") and len(rel) < len(str(path)) else str(path)


def _beside_python(name: str) -> Path | None:
    p = Path(sys.executable).parent / name  # the venv's bin folder (not resolved: a venv links python)
    return p if p.is_file() and os.access(p, os.X_OK) else None


def _prefix(name: str, module: str) -> str:
    on_path = shutil.which(name)
    mine = _beside_python(name)
    if on_path and (mine is None or Path(on_path).resolve() == mine.resolve()):
        return name
    if mine is not None:
        return shlex.quote(_short(mine))
    return f"{shlex.quote(_short(Path(sys.executable)))} -m {module}"


def diffsweep_command() -> str:
    return _prefix("diffsweep", "orchestrator")


def mlflow_command() -> str:
    return _prefix("mlflow", "mlflow")
