import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local test clusters only; clusters keep token auth on
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One small real Ray for the whole session (no dashboard)."""
    import ray

    if not ray.is_initialized():
        # two logical GPUs (Ray schedules them on a CPU machine too) for the tests of GPU-holding trials
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=200 * 1024 ** 2,
                 logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


def fashion_mnist_available() -> bool:
    return Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz").exists()


# Seconds each file took in a four-worker run (2026-12-02, 2 cores), longest first. The suite runs one file
# per xdist worker (--dist loadfile); xdist would order files by their number of tests, which starts the
# one-test, multi-minute files last and leaves a long tail. Starting them first packs the workers; files
# not listed run after these, in collection order.
LONGEST_FIRST = {
    "test_faults_mlflow.py": 227, "test_sweep_e2e.py": 222, "test_benchmark_heads.py": 210,
    "test_benchmark_scale.py": 201, "test_extraction.py": 190, "test_local_ray.py": 186,
    "test_faults_trial.py": 178, "test_sweep_heads.py": 176, "test_mlflow_model.py": 169,
    "test_cluster_job.py": 143, "test_faults.py": 135, "test_ddpm.py": 122, "test_benchmarks.py": 117,
    "test_select.py": 110, "test_unet.py": 100, "test_class_conditional.py": 83, "test_example.py": 67,
    "test_api.py": 57, "test_cluster_run.py": 50, "test_trial_errors.py": 33,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -LONGEST_FIRST.get(Path(str(item.fspath)).name, 0))  # stable: order within a file kept
