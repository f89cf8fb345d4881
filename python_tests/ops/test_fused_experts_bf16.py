"""fused_experts with bf16 activations and bf16 weights: the all-bf16 CPU path (csrc/cpu/fused_experts_bf16.cpp,
taken on CPUs with bf16 matmul instructions when some expert has more rows than the weight-streaming kernel
handles) against a float64 computation and the pure-PyTorch reference at bf16 tolerance, the float path
(EUREKA_FAST_BF16_EXPERTS=0, in a subprocess), and the edge cases of docs/ops.md. On CPUs without bf16 matmuls
the same tests check the float path."""
import math
import os
import subprocess
import sys

import pytest
import torch

import eureka_fast.ops as ops
from eureka_fast.ops import reference as ref

pytestmark = [
    pytest.mark.skipif(ops.backend() != "compiled", reason="eureka_fast._C is not built"),
    pytest.mark.usefixtures("poisoned_empty_tensors"),
]

BF16 = dict(atol=2e-2, rtol=2e-2)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_ids(T, E, k, routing, gen):
    if T == 0:
        return torch.zeros(0, k, dtype=torch.int32)
    if routing == "uniform":
        scores = torch.rand(T, E, generator=gen)
    elif routing == "skewed":  # Zipf-like: the last experts get few or no rows
        scores = torch.rand(T, E, generator=gen) * (1.0 / torch.arange(1, E + 1)) ** 3
    else:  # all_to_one: experts 0..k-1 for every token
        scores = torch.zeros(T, E)
        scores[:, :k] = torch.arange(k, 0, -1, dtype=torch.float32)
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].to(torch.int32)


def layer(T, H, I, E, k, routing="uniform", seed=0):
    """bf16 inputs of O(0.1..1) (docs/ops.md), fp32 routing weights summing to one per token."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, H, generator=gen) * 0.5).to(torch.bfloat16)
    w_gate_up = (torch.randn(E, 2 * I, H, generator=gen) / math.sqrt(H)).to(torch.bfloat16)
    w_down = (torch.randn(E, H, I, generator=gen) / math.sqrt(I)).to(torch.bfloat16)
    ids = make_ids(T, E, k, routing, gen)
    weights = torch.rand(T, k, generator=gen) + 0.1
    weights = weights / weights.sum(dim=1, keepdim=True)
    return x, w_gate_up, w_down, weights, ids


def float64_layer(x, w_gate_up, w_down, weights, ids, activation="silu"):
    return ref.fused_experts(x.double(), w_gate_up.double(), w_down.double(), weights.double(), ids, activation)


def check(x, w_gate_up, w_down, weights, ids, activation="silu"):
    out = ops.fused_experts(x, w_gate_up, w_down, weights, ids, activation=activation)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), float64_layer(x, w_gate_up, w_down, weights, ids, activation), **BF16)
    torch.testing.assert_close(out.float(), ref.fused_experts(x, w_gate_up, w_down, weights, ids, activation).float(),
                               **BF16)
    return out


@pytest.mark.parametrize("T,E,k,routing", [
    (0, 8, 2, "uniform"), (1, 8, 2, "uniform"), (1, 1, 1, "uniform"), (40, 1, 1, "uniform"),
    (300, 8, 8, "uniform"),  # k = E
    (200, 2, 2, "uniform"), (33, 8, 2, "all_to_one"), (300, 64, 8, "skewed"),  # experts with 0 rows
    (700, 4, 1, "all_to_one"),  # one expert past the task row limit: split into blocks
    (300, 16, 4, "skewed"),  # big and few-rows experts in one call
])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_bf16_layer_against_float64_and_reference(T, E, k, routing, activation):
    H, I = 72, 40
    check(*layer(T, H, I, E, k, routing, seed=T + E + k), activation=activation)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_bf16_matmul_and_streaming_experts_in_one_call(activation):
    """Rows per expert 90 (matmul), 1..8 (weight-streaming kernel), 0, and 9 (the first matmul size)."""
    x, w_gate_up, w_down, weights, _ = layer(120, 56, 40, 6, 1)
    ids = torch.tensor([0] * 90 + [1] * 8 + [3] * 1 + [4] * 9 + [5] * 12, dtype=torch.int64)[torch.randperm(
        120, generator=torch.Generator().manual_seed(3))].unsqueeze(1)
    check(x, w_gate_up, w_down, torch.ones(120, 1), ids, activation=activation)


@pytest.mark.parametrize("H,I", [(21, 10), (33, 17), (130, 70)])
def test_bf16_widths_not_multiples_of_16(H, I):
    check(*layer(200, H, I, 8, 2, "skewed", seed=H))


def test_bf16_non_contiguous_x_and_transposed_weights():
    x, w_gate_up, w_down, weights, ids = layer(120, 48, 40, 4, 2)
    want = ops.fused_experts(x, w_gate_up, w_down, weights, ids)
    x_cm = x.t().contiguous().t()  # column-major x
    x_strided = torch.stack([x, -x], dim=2).reshape(x.shape[0], -1)[:, ::2]  # row stride 2H, column stride 2
    x_rows = torch.cat([x, x], dim=1)[:, :48]  # rows contiguous, row stride 2H
    for xv in (x_cm, x_strided, x_rows):
        torch.testing.assert_close(ops.fused_experts(xv, w_gate_up, w_down, weights, ids), want, atol=0, rtol=0)
    wgu_t = w_gate_up.transpose(1, 2).contiguous().transpose(1, 2)  # [E, 2I, H] view of [E, H, 2I] storage
    wd_t = w_down.transpose(1, 2).contiguous().transpose(1, 2)
    for wgu, wd in ((wgu_t, w_down), (w_gate_up, wd_t), (wgu_t, wd_t)):
        check(x, wgu, wd, weights, ids)
    # one expert of a larger tensor (expert stride != 2I * H) and broadcast (stride 0) experts
    wgu_big = torch.stack([w_gate_up, -w_gate_up], dim=1).flatten(0, 1)[::2]
    assert torch.equal(wgu_big, w_gate_up) and wgu_big.stride(0) == 2 * w_gate_up.stride(0)
    torch.testing.assert_close(ops.fused_experts(x, wgu_big, w_down, weights, ids), want, atol=0, rtol=0)
    ids0 = torch.zeros_like(ids)
    ids0[:, 1] = 1
    check(x, w_gate_up[:1].expand(4, -1, -1), w_down[:1].expand(4, -1, -1), weights, ids0)


def test_bf16_routing_weights_in_bf16_and_fp32():
    x, w_gate_up, w_down, weights, ids = layer(150, 64, 32, 8, 2)
    check(x, w_gate_up, w_down, weights.to(torch.bfloat16), ids)
    check(x, w_gate_up, w_down, weights, ids)


@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_deterministic_and_thread_count_invariant(threads):
    x, w_gate_up, w_down, weights, ids = layer(600, 64, 48, 8, 2, "skewed")
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        a = ops.fused_experts(x, w_gate_up, w_down, weights, ids)
        b = ops.fused_experts(x, w_gate_up, w_down, weights, ids)
        torch.set_num_threads(1)
        c = ops.fused_experts(x, w_gate_up, w_down, weights, ids)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(a, b)
    # a task's rows do not depend on which worker runs it, or on how many there are
    assert torch.equal(a, c)


def test_bf16_every_row_written():
    """The sorted output rows live in a buffer kept between calls: a call on NaN inputs fills it with NaN, so any
    row the next (different) call forgets to write would show up in its output."""
    x, w_gate_up, w_down, weights, ids = layer(500, 64, 40, 8, 2)
    ops.fused_experts(torch.full_like(x, float("nan")), w_gate_up, w_down, weights, ids)
    x2, _, _, weights2, ids2 = layer(300, 64, 40, 8, 2, "skewed", seed=5)
    check(x2, w_gate_up, w_down, weights2, ids2)


def test_bf16_gradients_still_flow():
    x, w_gate_up, w_down, weights, ids = layer(64, 32, 24, 4, 2)
    leaves = [t.clone().requires_grad_() for t in (x, w_gate_up, w_down, weights)]
    out = ops.fused_experts(*leaves, ids)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out.float() * up).sum(), leaves)
    f64 = [t.detach().double().requires_grad_() for t in (x, w_gate_up, w_down, weights)]
    want = torch.autograd.grad((ref.fused_experts(*f64, ids) * up.double()).sum(), f64)
    torch.testing.assert_close(out.double(), ref.fused_experts(*[t.detach().double() for t in leaves], ids), **BF16)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double(), w, atol=3e-2, rtol=3e-2)


def _x_widened_copies(x, w_gate_up, w_down, weights, ids):
    """How many dtype conversions the op makes (the float path widens x to fp32 and narrows its fp32 output; int64
    ids and fp32 routing weights need none)."""
    ids = ids.long()
    with torch.profiler.profile() as prof:
        ops.fused_experts(x, w_gate_up, w_down, weights, ids)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


def test_bf16_path_taken_only_where_it_applies():
    if not _cpu_has_bf16_matmul():
        pytest.skip("no bf16 matmul instructions on this CPU: the float path runs")
    x, w_gate_up, w_down, weights, ids = layer(200, 64, 40, 4, 2)
    assert _x_widened_copies(x, w_gate_up, w_down, weights, ids) == 0  # all-bf16 path: no fp32 copy of x
    # few rows per expert (decode): the float path with the weight-streaming kernel, as before
    xd, _, _, wd_, idsd = layer(3, 64, 40, 4, 2, seed=1)
    assert _x_widened_copies(xd, w_gate_up, w_down, wd_, idsd) > 0
    # transposed weight views: the float path (it reads any layout)
    wd_t = w_down.transpose(1, 2).contiguous().transpose(1, 2)
    assert _x_widened_copies(x, w_gate_up, wd_t, weights, ids) > 0


def _cpu_has_bf16_matmul():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return " avx512_bf16" in flags and " avx512f" in flags and os.environ.get("EUREKA_FAST_CPU_ISA") in (None, "", "avx512")


_SWITCH_SCRIPT = r"""
import math, sys, torch
sys.path.insert(0, {root!r})
import eureka_fast.ops as ops
sys.path.insert(0, {tests!r})
from test_fused_experts_bf16 import layer, _x_widened_copies
args = layer(400, 64, 40, 8, 2, "skewed")
out = ops.fused_experts(*args)
torch.save({{"out": out, "copies": _x_widened_copies(*args)}}, sys.argv[1])
"""


def test_bf16_env_switch_forces_the_float_path(tmp_path):
    """EUREKA_FAST_BF16_EXPERTS=0 (read once per process, so in a subprocess) sends the layer to the float path;
    both paths agree to bf16 rounding (the same bf16 matmuls, so almost everywhere bitwise)."""
    results = {}
    for switch in ("0", "1"):
        env = dict(os.environ, EUREKA_FAST_BF16_EXPERTS=switch)
        path = tmp_path / f"out{switch}.pt"
        script = _SWITCH_SCRIPT.format(root=ROOT, tests=os.path.dirname(os.path.abspath(__file__)))
        subprocess.run([sys.executable, "-c", script, str(path)], env=env, check=True, cwd=ROOT)
        results[switch] = torch.load(path)
    off, on = results["0"], results["1"]
    assert off["copies"] > 0
    if _cpu_has_bf16_matmul():
        assert on["copies"] == 0
    args = layer(400, 64, 40, 8, 2, "skewed")
    want = float64_layer(*args)
    for r in (off, on):
        torch.testing.assert_close(r["out"].double(), want, **BF16)
    torch.testing.assert_close(on["out"].float(), off["out"].float(), atol=1e-2, rtol=1e-2)
