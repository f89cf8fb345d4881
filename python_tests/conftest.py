"""Fixtures shared by test modules in several folders."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that run many small ops (loop references, tiny models), which intra-op threads only slow down,
    badly so when the cores are shared: one thread keeps them fast. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
