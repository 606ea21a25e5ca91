"""The deploy tests run with one intra-op thread: on two shared cores, more threads only
contend with the other processes (the exports and the compiled training are CPU-bound)."""
import pytest
import torch


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread for the module, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
