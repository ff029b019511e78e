import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny nets only lose to a second intra-op thread (start-up and synchronisation), badly so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
