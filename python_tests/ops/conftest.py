import pytest
import torch


@pytest.fixture
def poisoned_empty_tensors():
    """Every uninitialised allocation (torch.empty / at::empty, in the kernels too) is filled with NaN, so an output
    element a kernel forgets to write shows up as NaN instead of a lucky zero. Opt in per module with
    ``pytestmark = pytest.mark.usefixtures("poisoned_empty_tensors")``."""
    import torch.utils.deterministic as det

    prev_alg, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        det.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev_alg, warn_only=prev_warn)
