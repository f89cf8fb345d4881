"""eureka_fast.ops.registry: loading the extension, kernel lookup and the kernel-or-reference decision."""
import torch

from eureka_fast import ops
from eureka_fast.ops import registry


def test_backend_follows_the_extension():
    assert registry.backend() == ops.backend() == ("compiled" if registry.load_extension() else "reference")


def test_an_op_this_build_does_not_define_has_no_kernel():
    assert not registry.has_kernel("no_such_op", torch.device("cpu"))
    assert not registry.use_kernel("no_such_op", torch.device("cpu"))


def test_use_reference_always_wins():
    assert not registry.use_kernel("route_topk", torch.device("cpu"), use_reference=True)
    if registry.load_extension():
        assert registry.use_kernel("route_topk", torch.device("cpu"))


def test_cpu_kernel_runs_only_for_float_cpu_tensors():
    loaded = registry.load_extension()
    assert registry.cpu_kernel_runs("bias_gelu_", torch.zeros(2, 2)) == loaded
    assert registry.cpu_kernel_runs("bias_gelu_", torch.zeros(2, 2, dtype=torch.float64)) == loaded
    assert not registry.cpu_kernel_runs("bias_gelu_", torch.zeros(2, 2, dtype=torch.bfloat16))
    assert not registry.cpu_kernel_runs("bias_gelu_", torch.zeros(2, 2, device="meta"))


def test_on_load_runs_a_registration_once_the_extension_is_loaded():
    calls = []
    registry.on_load(lambda: calls.append("registered"))
    # the extension loaded when eureka_fast.ops was imported: a late registration runs at once; without it, never
    assert calls == (["registered"] if registry.load_extension() else [])
