"""pytest-benchmark microbenchmarks, one per op, at a mid-size MoE shape (T=256, H=512, I=256, E=32, k=4).

    python -m pytest python_tests/ops/test_bench_ops.py --benchmark-enable --benchmark-columns=min,median,mean

(pyproject's addopts disable benchmarking by default, so the suite runs each benchmark once, as a smoke test.)
"""
import math

import pytest
import torch

import eureka_fast.ops as ops
from eureka_fast.integrations.downsample_presets import downsample_preset

T, H, I, E, K = 256, 512, 256, 32, 4


@pytest.fixture(scope="module")
def moe():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=gen)
    logits = torch.randn(T, E, generator=gen)
    w_gate_up = torch.randn(E, 2 * I, H, generator=gen) / math.sqrt(H)
    w_down = torch.randn(E, H, I, generator=gen) / math.sqrt(I)
    weights, ids = ops.route_topk(logits, K, renormalize=True)
    plan = ops.moe_plan(ids, E)
    x_sorted = ops.permute(x, plan)
    hidden = ops.grouped_mm(x_sorted, w_gate_up, plan.offsets, activation="silu_mul")
    y_sorted = ops.grouped_mm(hidden, w_down, plan.offsets)
    return dict(x=x, logits=logits, w_gate_up=w_gate_up, w_down=w_down, weights=weights, ids=ids, plan=plan,
                x_sorted=x_sorted, hidden=hidden, y_sorted=y_sorted)


def test_route_topk(benchmark, moe):
    w, ids = benchmark(ops.route_topk, moe["logits"], K, renormalize=True)
    assert torch.equal(ids, moe["ids"])


def test_moe_plan(benchmark, moe):
    plan = benchmark(ops.moe_plan, moe["ids"], E)
    assert int(plan.counts.sum()) == T * K


def test_permute(benchmark, moe):
    out = benchmark(ops.permute, moe["x"], moe["plan"])
    assert torch.equal(out, moe["x_sorted"])


def test_combine(benchmark, moe):
    out = benchmark(ops.combine, moe["y_sorted"], moe["plan"], moe["weights"])
    assert out.shape == (T, H)


def test_grouped_mm_silu_mul(benchmark, moe):
    out = benchmark(ops.grouped_mm, moe["x_sorted"], moe["w_gate_up"], moe["plan"].offsets, activation="silu_mul")
    torch.testing.assert_close(out, moe["hidden"])


def test_fused_experts(benchmark, moe):
    args = (moe["x"], moe["w_gate_up"], moe["w_down"], moe["weights"], moe["ids"])
    out = benchmark(ops.fused_experts, *args)
    torch.testing.assert_close(out, ops.combine(moe["y_sorted"], moe["plan"], moe["weights"]), atol=1e-5, rtol=1e-4)


def test_fused_experts_eager_loop_baseline(benchmark, moe):
    from eureka_fast.benchmarks import eager_expert_loop

    benchmark(eager_expert_loop, moe["x"], moe["w_gate_up"], moe["w_down"], moe["weights"], moe["ids"])


def test_moe_aux_loss(benchmark, moe):
    loss = benchmark(ops.moe_aux_loss, torch.softmax(moe["logits"], -1), moe["ids"])
    assert loss.dim() == 0


def test_stack_norm_project_eureka(benchmark):
    gen = torch.Generator().manual_seed(1)
    preset = downsample_preset("eureka", 384, 512, generator=gen)
    x = torch.randn(4, 400, 384, generator=gen)
    out = benchmark(ops.stack_norm_project, x, **preset)
    assert out.shape == (4, 100, 512)
