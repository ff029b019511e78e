import os
from pathlib import Path

import pytest
import torch

# The project's machines keep the offline data sets (the CIFAR-10 JPEG copy, GTSRB) beside the checkout; bdguard
# itself looks only where it is told (--data-root, $BDGUARD_DATA) and in ./data and its cache.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if SHARED_DATA.is_dir():
    os.environ.setdefault("BDGUARD_DATA", str(SHARED_DATA))

# Under pytest-xdist each worker gets its share of the cores, for torch here and for the commands it starts: more
# threads than cores only spin.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _share = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    torch.set_num_threads(_share)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny nets only lose to a second intra-op thread (start-up and synchronisation), badly so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
