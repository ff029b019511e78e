import os
from pathlib import Path

import pytest
import torch

# The project's machines keep the offline data sets (the CIFAR-10 JPEG copy, GTSRB) beside the checkout; bdguard
# itself looks only where it is told (--data-root, $BDGUARD_DATA) and in ./data and its cache.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if SHARED_DATA.is_dir():
    os.environ.setdefault("BDGUARD_DATA", str(SHARED_DATA))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny nets only lose to a second intra-op thread (start-up and synchronisation), badly so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
