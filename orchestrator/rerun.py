"""A sweep name already used is never reused silently: refuse with the choices, or replace it
when asked (`--overwrite`). Runs before Ray starts; needs only the config."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from orchestrator.config import ConfigError

STATE_FILE = "diffsweep_sweep.json"  # the same name orchestrator.sweep writes


def sweep_folder(cfg) -> str:
    path = cfg.storage_path
    return f"{path.rstrip('/')}/{cfg.name}" if "://" in path else str(Path(path).expanduser().resolve() / cfg.name)


def check_new_sweep(cfg, overwrite: bool = False, how: str = "pass --overwrite") -> None:
    """Raise ConfigError when a sweep of this name exists in the storage path, unless `overwrite`:
    then its Tune state is removed (its MLflow runs stay; the new sweep gets a new parent run)."""
    folder = sweep_folder(cfg)
    if "://" in folder:  # remote storage: Tune itself refuses nothing there; check through pyarrow.fs
        import pyarrow.fs as pafs
        fs, path = pafs.FileSystem.from_uri(folder)
        exists = fs.get_file_info(f"{path}/{STATE_FILE}").type != pafs.FileType.NotFound
    else:
        exists = (Path(folder) / STATE_FILE).is_file()
    if not exists:
        return
    if not overwrite:
        from orchestrator.hints import diffsweep_command
        where = "" if cfg.storage_path == "runs/ray" else f" --storage-path {cfg.storage_path}"
        raise ConfigError(f"sweep '{cfg.name}' already exists at {folder}; continue it with `{diffsweep_command()} "
                          f"resume {cfg.name}{where}`, pick a new name (--name NEW or `name:` in the YAML), or {how} to replace it")
    if "://" in folder:
        fs.delete_dir(path)
    else:
        shutil.rmtree(folder)
    print(f"note: replaced the earlier sweep '{cfg.name}' at {folder} (its MLflow runs are kept; this sweep "
          "gets a new parent run)", file=sys.stderr, flush=True)
