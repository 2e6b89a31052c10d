import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local test clusters only; clusters keep token auth on
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# One torch thread per process (this one and every child: CLI drivers, servers). The suite keeps every
# core busy with four workers and their Ray workers (which Ray already runs at OMP_NUM_THREADS=1); more
# threads per process only oversubscribe the cores (measured: test_example.py 22.2 CPU-s with torch's
# default two threads, 18.0 with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# `mlflow server` (MLflow 3) starts a job runner with a dozen Huey consumer processes for its GenAI jobs,
# which diffsweep never submits: measured 33 CPU-seconds of test_faults_mlflow.py's two server starts.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


@contextlib.contextmanager
def small_ray():
    """A small real Ray (no dashboard) for as long as the block runs; an already running one is used."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    # two logical GPUs (Ray schedules them on a CPU machine too) for the tests of GPU-holding trials.
    # Idle workers are kept (Ray kills those above num_cpus after 1 s): the next test's sweep runs its
    # extraction tasks in a worker that has imported torch already (test_sweep_heads.py's three sweeps:
    # 17 worker processes, 61 CPU-s -> 12, 45 CPU-s)
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=200 * 1024 ** 2,
             logging_level="WARNING", log_to_driver=False,
             _system_config={"num_workers_soft_limit": 6, "idle_worker_killing_time_threshold_ms": 600_000})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local():
    """One Ray per test module that asks for it, shut down after the module: an idle Ray still costs
    about 2 CPU-seconds a minute (measured), and the worker that ran the module goes on to others."""
    with small_ray() as ray:
        yield ray


def fashion_mnist_available() -> bool:
    return Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz").exists()


def session_root(tmp_path_factory) -> Path:
    """A folder every xdist worker of this run shares (the parent of their base temp dirs); a plain
    pytest run has its own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def shared_features(tmp_path_factory) -> Path:
    """One feature store for the sweeps that are about something else than extraction (where Ray runs,
    failing trials, head types): the sweeps of one dataset subset then extract it once per run, not
    once each. Sweeps may fill it at the same time (even from different Ray clusters): a part file is
    written under a temporary name and renamed into place whole, so both write the same bytes."""
    return session_root(tmp_path_factory) / "shared_features"


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with its schema built, made once per run (xdist workers share it).
    MLflow builds a new store's schema by running every one of its migrations when the file is first
    opened (1.5 CPU-seconds, measured); the sweeps of tests about something else start from a copy
    (`tiny_space(..., mlflow_template=...)`, test_faults_mlflow.py's server). Stores still made from
    nothing: tests/test_tracking.py, test_cli.py, test_cka.py, the class-conditional and multi-node
    sweeps, the benchmarks."""
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    path = session_root(tmp_path_factory) / "mlflow_template.db"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            building = path.with_name("mlflow_template.building.db")
            MlflowClient(f"sqlite:///{building}").search_experiments()
            building.rename(path)  # whole or not at all
    return path


@dataclass(frozen=True)
class SharedSweep:
    folder: Path  # the sweep's store, MLflow sqlite, Tune storage and exports
    space: Path
    datasets: list[str]
    selected: dict  # diffsweep.run's outcome.selected, as JSON
    started_ns: int  # time.time_ns() just before the sweep started


@pytest.fixture(scope="session")
def shared_sweep(tmp_path_factory, mlflow_template) -> SharedSweep:
    """One real tiny sweep (digits + Fashion-MNIST, `diffsweep.run(..., register_model="digits-clf")`
    from an empty store) that test_sweep_e2e, test_mlflow_model and test_select all read. The xdist
    worker that asks first makes it under a file lock; the others wait on the lock and read its files
    (pytest-xdist's recipe for a session fixture made once). Tests read it; none writes into it."""
    from filelock import FileLock

    from tests.spaces import tiny_space

    folder = session_root(tmp_path_factory) / "shared_sweep"
    done = folder / "outcome.json"
    with FileLock(str(folder) + ".lock"):
        if not done.exists():
            import diffsweep

            folder.mkdir(exist_ok=True)
            datasets = [{"name": "digits", "val_fraction": 0.15, "limit": {"train": 800}}]
            if fashion_mnist_available():
                datasets.append({"name": "fashion_mnist", "limit": {"train": 400, "val": 150, "test": 200}})
            space = tiny_space(folder, name="shared", datasets=datasets, max_concurrent=2,  # two trials, as users run it
                               mlflow_template=mlflow_template)
            assert not (folder / "features").exists()  # every feature file is made by this sweep
            started = time.time_ns()
            with small_ray():  # only the worker that runs the sweep starts a Ray, for the sweep only
                outcome = diffsweep.run(space, register_model="digits-clf")
            done.write_text(json.dumps({"space": str(space), "datasets": [d["name"] for d in datasets],
                                        "selected": outcome.selected, "started_ns": started}, default=str))
    doc = json.loads(done.read_text())
    return SharedSweep(folder=folder, space=Path(doc["space"]), datasets=doc["datasets"],
                       selected=doc["selected"], started_ns=doc["started_ns"])


# Seconds each file took in a four-worker run (2026-12-06, 2 cores), longest first. The suite runs one file
# per xdist worker (--dist loadfile); xdist would order files by their number of tests, which starts the
# one-test, multi-minute files last and leaves a long tail. Starting them first packs the workers; files
# not listed run after these, in collection order. test_mlflow_model.py and test_select.py are left out on
# purpose: they read the shared sweep test_sweep_e2e.py makes early, so they come last and wait for nothing.
LONGEST_FIRST = {
    "test_local_ray.py": 190, "test_benchmark_heads.py": 180, "test_faults_mlflow.py": 175,
    "test_sweep_heads.py": 120, "test_faults_trial.py": 115, "test_faults.py": 110, "test_benchmark_scale.py": 100,
    "test_class_conditional.py": 95, "test_extraction.py": 80, "test_benchmarks.py": 75, "test_cluster_run.py": 72,
    "test_sweep_e2e.py": 70, "test_cluster_job.py": 67, "test_trial_errors.py": 60, "test_api.py": 45,
    "test_example.py": 37, "test_ddpm.py": 25, "test_unet.py": 15,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -LONGEST_FIRST.get(Path(str(item.fspath)).name, 0))  # stable: order within a file kept
