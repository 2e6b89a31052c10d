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
