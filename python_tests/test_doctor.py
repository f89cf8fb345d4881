"""`eureka-audio doctor` run as a user runs it (a subprocess): it passes on this build, and fails (exit status 1, a
FAIL line naming the op, no traceback) when a kernel returns wrong values through its test-only hook."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import eureka_fast.ops as ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(ops.backend() != "compiled", reason="eureka_fast._C is not built")


def doctor(*args, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "EUREKA_FAST_DOCTOR_CORRUPT"}
    full_env.update(PYTHONPATH=ROOT, **env)
    code = "import sys; from eureka_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "doctor", *args], capture_output=True, text=True,
                          env=full_env, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def full_run():
    return doctor()


def test_doctor_passes_on_this_build(full_run):
    out = full_run.stdout
    assert full_run.returncode == 0, out + full_run.stderr
    assert "Traceback" not in full_run.stderr
    assert "CPU instruction set picked at run time:" in out
    # every MoE op is checked in both dtypes over T = 0, 1, 300 with skewed routing
    for op in ("route_topk", "moe_aux_loss", "permute", "combine", "combine_backward", "grouped_mm",
               "grouped_mm_backward", "fused_experts", "stack_norm_project"):
        for dtype in ("float32", "bfloat16"):
            assert any(line.split()[:4] == ["PASS", "cpu", op, dtype] and "T=0,1,300 skewed" in line
                       for line in out.splitlines()), (op, dtype, out)
    assert any(line.split()[:3] == ["PASS", "cpu", "moe_plan"] for line in out.splitlines())
    assert any(line.split()[:3] == ["PASS", "cpu", "mel_power"] for line in out.splitlines())
    assert " 0 failed" in out
    import torch

    if not torch._C._dispatch_has_kernel_for_dispatch_key("eureka_fast::grouped_mm", "CUDA"):
        assert "CUDA kernels: absent" in out


@pytest.mark.parametrize("op", ["fused_experts", "moe_plan", "attention"])
def test_doctor_fails_on_a_wrong_kernel(op):
    run = doctor("--ops", op, EUREKA_FAST_DOCTOR_CORRUPT=op)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    fails = [line for line in run.stdout.splitlines() if line.split()[:1] == ["FAIL"]]
    assert fails and all(line.split()[2] == op for line in fails), run.stdout


def test_doctor_bad_argument_is_one_line():
    run = doctor("--ops", "warp_drive")
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and "warp_drive" in run.stderr
