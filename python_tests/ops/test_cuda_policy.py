"""The CUDA dispatch policy (eureka_fast/ops/cuda_policy.py): which CUDA kernel paths may run on users' tensors.

The decision needs no GPU: it is a pure function of the validation table and EUREKA_FAST_CUDA_KERNELS, and the op
wrappers' hook is checked by pretending the build has CUDA kernels.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import eureka_fast.ops as ops
from eureka_fast.ops import cuda_policy as cp, registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
compiled = pytest.mark.skipif(ops.backend() != "compiled", reason="eureka_fast._C is not built")

H100 = cp.Validation("NVIDIA H100 80GB HBM3", "2027-01-15", "CUDA op tests passed")


def table(*validated: str):
    """The real table with the named paths marked validated."""
    return {name: replace(p, validated=H100) if name in validated else p for name, p in cp.KERNEL_PATHS.items()}


@pytest.fixture(autouse=True)
def _restore_policy():
    yield
    cp.configure()


def test_no_cuda_kernel_is_validated_yet():
    # The state of this tree: nothing has run on a GPU, so the default runs none of them.
    assert all(p.validated is None for p in cp.KERNEL_PATHS.values())
    default = cp.parse_setting(None)
    for name in cp.KERNEL_PATHS:
        decision = cp.decide(name, default)
        assert not decision.kernel
        assert "not validated" in decision.reason
    assert cp.regime_mask(default) == 0


@pytest.mark.parametrize("text, mode", [(None, "validated"), ("", "validated"), (" Validated ", "validated"),
                                        ("all", "all"), ("NONE", "none"), ("grouped_mm, gemm:simt", "list")])
def test_parse_setting(text, mode):
    assert cp.parse_setting(text).mode == mode


@pytest.mark.parametrize("text", ["grouped_mm,gemm:fast", "bogus", ","])
def test_parse_setting_names_the_bad_entry(text):
    with pytest.raises(ValueError, match="EUREKA_FAST_CUDA_KERNELS") as info:
        cp.parse_setting(text)
    if "fast" in text or "bogus" in text:
        assert ("gemm:fast" if "fast" in text else "bogus") in str(info.value)


def test_validated_paths_run_by_default_and_name_the_record():
    t = table("route_topk", "moe_plan")
    default = cp.parse_setting(None)
    decision = cp.decide("route_topk", default, t)
    assert decision.kernel and "H100" in decision.reason and "2027-01-15" in decision.reason
    assert cp.decide("moe_plan", default, t).kernel
    assert not cp.decide("combine", default, t).kernel


def test_dependencies_gate_the_op():
    # fused_experts' kernel (and the backward autograd runs through the library's ops) also runs the plan,
    # permute, combine and grouped GEMM kernels and the SIMT fallback: validated alone, it still may not run.
    default = cp.parse_setting(None)
    t = table("fused_experts")
    decision = cp.decide("fused_experts", default, t)
    assert not decision.kernel and decision.reason.startswith("needs moe_plan")
    t = table("fused_experts", "moe_plan", "permute", "combine", "grouped_mm")
    decision = cp.decide("fused_experts", default, t)
    assert not decision.kernel and "gemm:simt" in decision.reason
    t = table("fused_experts", "moe_plan", "permute", "combine", "grouped_mm", "gemm:simt")
    assert cp.decide("fused_experts", default, t).kernel
    # permute's backward is a combine
    assert not cp.decide("permute", default, table("permute")).kernel
    assert cp.decide("permute", default, table("permute", "combine")).kernel


def test_opt_in_all_none_and_lists():
    everything = cp.parse_setting("all")
    assert all(cp.decide(n, everything).kernel for n in cp.KERNEL_PATHS)
    assert cp.regime_mask(everything) == 15
    assert "EUREKA_FAST_CUDA_KERNELS=all" in cp.decide("grouped_mm", everything).reason

    none = cp.parse_setting("none")
    t = table(*cp.KERNEL_PATHS)  # even validated paths are off
    assert not any(cp.decide(n, none, t).kernel for n in cp.KERNEL_PATHS)
    assert cp.regime_mask(none, t) == 0

    listed = cp.parse_setting("grouped_mm")
    assert not cp.decide("grouped_mm", listed).kernel  # no GEMM regime to fall back on
    listed = cp.parse_setting("grouped_mm,gemm:tiled,gemm:simt")
    assert cp.decide("grouped_mm", listed).kernel
    assert not cp.decide("fused_experts", listed).kernel
    assert cp.regime_mask(listed) == 2 | 8
    # a list adds to the validated paths
    assert cp.decide("route_topk", cp.parse_setting("combine"), table("route_topk")).kernel


def test_wrapper_hook_follows_the_policy(monkeypatch):
    """The op wrappers' choice on a CUDA tensor, with the build pretending to have CUDA kernels."""
    monkeypatch.setattr(registry, "load_extension", lambda: True)
    monkeypatch.setattr(registry, "has_kernel", lambda op, device: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cp.configure("")
    assert not registry.use_kernel("grouped_mm", cuda, False)
    assert not registry.use_kernel("route_topk", cuda, False)
    assert registry.use_kernel("grouped_mm", cpu, False)  # CPU kernels are not gated
    cp.configure("all")
    assert registry.use_kernel("grouped_mm", cuda, False)
    assert not registry.use_kernel("grouped_mm", cuda, True)  # use_reference still wins
    cp.configure("route_topk")
    assert registry.use_kernel("route_topk", cuda, False)
    assert not registry.use_kernel("fused_experts", cuda, False)


def test_configure_rejects_bad_values_and_keeps_the_policy():
    cp.configure("all")
    with pytest.raises(ValueError, match="bogus"):
        cp.configure("bogus")
    assert cp.active_setting().mode == "all"


@compiled
def test_configure_hands_the_regime_mask_to_the_library():
    from eureka_fast import _C

    cp.configure("gemm:tiled,gemm:simt")
    assert _C.cuda_gemm_regimes() == 2 | 8
    cp.configure("all")
    assert _C.cuda_gemm_regimes() == 15
    cp.configure("")
    assert _C.cuda_gemm_regimes() == 0


@compiled
def test_backend_report():
    cpu = ops.backend_report("cpu")
    assert set(cpu) == set(cp.POLICY_OPS)
    assert all(path == "kernel" for path, _ in cpu.values())
    cuda = ops.backend_report("cuda")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("eureka_fast::fused_experts", "CUDA"):
        assert all(path == "reference" and "no CUDA kernel" in why for path, why in cuda.values())
    else:  # a CUDA build: nothing is validated yet, so the default takes the references
        assert all(path == "reference" and "not validated" in why for path, why in cuda.values())
    with pytest.raises(ValueError, match="device"):
        ops.backend_report("tpu")


@compiled
def test_build_without_cuda_reports_it_absent():
    from eureka_fast import _C

    info = _C.build_info()
    assert info["cpu_isa"] in ("baseline", "avx2", "avx512")
    has_cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("eureka_fast::grouped_mm", "CUDA")
    assert info["with_cuda"] == has_cuda_kernels
    if not has_cuda_kernels:
        assert "cuda_compiled_version" not in info


def test_bad_environment_fails_on_use_with_the_setting_named():
    code = ("import torch, eureka_fast.ops as ops\n"
            "from eureka_fast.ops import cuda_policy as cp\n"
            "w, i = ops.route_topk(torch.randn(3, 4), 2)\n"  # CPU ops are not gated
            "try:\n"
            "    cp.kernel_allowed('grouped_mm')\n"
            "except ValueError as e:\n"
            "    print('ERR', e)\n")
    env = dict(os.environ, EUREKA_FAST_CUDA_KERNELS="grouped_mm,turbo", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR EUREKA_FAST_CUDA_KERNELS='grouped_mm,turbo'" in out.stdout and "turbo" in out.stdout
