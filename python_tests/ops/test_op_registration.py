"""Op registration (opcheck, torch.compile), argument validation and the reference fallback."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import eureka_fast.ops as ops

pytestmark = pytest.mark.usefixtures("poisoned_empty_tensors")
compiled = pytest.mark.skipif(ops.backend() != "compiled", reason="eureka_fast._C is not built")
OPS = torch.ops.eureka_fast if ops.backend() == "compiled" else None


def _moe_inputs(T=9, H=6, I=4, E=5, k=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen, dtype=dtype)
    wgu = torch.randn(E, 2 * I, H, generator=gen, dtype=dtype) * 0.3
    wd = torch.randn(E, H, I, generator=gen, dtype=dtype) * 0.3
    ids = torch.sort(torch.rand(T, E, generator=gen), 1).indices[:, :k].to(torch.int32)
    weights = torch.rand(T, k, generator=gen, dtype=dtype)
    return x, wgu, wd, weights, ids


@compiled
def test_opcheck_every_op():
    x, wgu, wd, weights, ids = _moe_inputs(dtype=torch.float64)
    E, k = wgu.shape[0], ids.shape[1]
    counts, offsets, padded, sorted_rows, inverse_rows = OPS.moe_plan(ids, E, 0)
    xs = OPS.permute(x, sorted_rows, k)
    rg = dict(requires_grad=True)
    cases = [
        (OPS.route_topk, (torch.randn(9, 5, dtype=torch.float64, **rg), 2, "softmax", True, None, 1, 1, 1.0)),
        (OPS.route_topk, (torch.randn(9, 8, dtype=torch.float64, **rg), 3, "sigmoid", False, torch.randn(8, dtype=torch.float64),
                          4, 2, 2.0)),
        (OPS.moe_aux_loss, (torch.softmax(torch.randn(9, E, dtype=torch.float64), -1).requires_grad_(), ids)),
        (OPS.moe_plan, (ids, E, 4)),
        (OPS.permute, (x.clone().requires_grad_(), sorted_rows, k)),
        (OPS.combine, (xs.clone().requires_grad_(), inverse_rows, weights.clone().requires_grad_())),
        (OPS.combine_backward, (torch.randn_like(x), xs, inverse_rows, weights)),
        (OPS.grouped_mm, (xs.clone().requires_grad_(), wgu.clone().requires_grad_(), offsets, "silu_mul")),
        (OPS.grouped_mm, (xs.clone().requires_grad_(), wgu.clone().requires_grad_(), offsets, "none")),
        (OPS.grouped_mm_backward, (torch.randn(xs.shape[0], 4, dtype=torch.float64), xs, wgu, offsets, "gelu_mul")),
        (OPS.fused_experts, (x.clone().requires_grad_(), wgu.clone().requires_grad_(), wd.clone().requires_grad_(),
                             weights.clone().requires_grad_(), ids, "silu")),
        (OPS.stack_norm_project, (torch.randn(2, 7, 3, dtype=torch.float64, **rg), 2, torch.tensor([7, 3]), "layer",
                                  torch.randn(6, dtype=torch.float64, **rg), torch.randn(6, dtype=torch.float64, **rg),
                                  torch.randn(8, 6, dtype=torch.float64, **rg), torch.randn(8, dtype=torch.float64, **rg),
                                  "swiglu", torch.randn(5, 4, dtype=torch.float64, **rg), None, 1e-5, "stack")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


class TinyMoE(torch.nn.Module):
    def __init__(self, H=16, I=12, E=8, k=2):
        super().__init__()
        self.k = k
        self.router = torch.nn.Linear(H, E, bias=False)
        self.gate_up = torch.nn.Parameter(torch.randn(E, 2 * I, H) * 0.2)
        self.down = torch.nn.Parameter(torch.randn(E, H, I) * 0.2)

    def forward(self, x):
        logits = self.router(x)
        weights, ids = ops.route_topk(logits, self.k, renormalize=True)
        out = ops.fused_experts(x, self.gate_up, self.down, weights, ids)
        aux = ops.moe_aux_loss(torch.softmax(logits, -1), ids)
        return out, aux


@compiled
def test_torch_compile_fullgraph_moe_layer():
    torch.manual_seed(0)
    layer = TinyMoE()
    x = torch.randn(20, 16, requires_grad=True)
    eager_out, eager_aux = layer(x)
    compiled_layer = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out, aux = compiled_layer(x)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(aux, eager_aux)
    (out.sum() + aux).backward()
    g_compiled = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    (eager_out.sum() + eager_aux).backward()
    for g, p in zip(g_compiled, layer.parameters()):
        torch.testing.assert_close(g, p.grad)


@compiled
def test_moe_plan_pieces_compile():
    def pipeline(x, ids, weights, w):
        plan = ops.moe_plan(ids, w.shape[0])
        y = ops.grouped_mm(ops.permute(x, plan), w, plan.offsets, activation="silu_mul")
        return ops.combine(y, plan, weights)

    x, wgu, _, weights, ids = _moe_inputs()
    want = pipeline(x, ids, weights, wgu)
    got = torch.compile(pipeline, fullgraph=True, backend="aot_eager")(x, ids, weights, wgu)
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------------------------
# Bad input: a Python exception naming the argument, never a crash
# --------------------------------------------------------------------------------------------------------------
def _bad_cases():
    x, wgu, wd, weights, ids = _moe_inputs()
    plan = ops.moe_plan(ids, 5)
    logits = torch.randn(9, 5)
    return [
        ("logits rank", lambda: ops.route_topk(logits[0], 2), ValueError, "logits"),
        ("logits dtype", lambda: ops.route_topk(logits.long(), 2), TypeError, "logits"),
        ("k > E", lambda: ops.route_topk(logits, 6), ValueError, "k"),
        ("k < 1", lambda: ops.route_topk(logits, 0), ValueError, "k"),
        ("nan logits", lambda: ops.route_topk(torch.full((2, 5), float("nan")), 2), ValueError, "logits"),
        ("scoring", lambda: ops.route_topk(logits, 2, scoring="relu"), ValueError, "scoring"),
        ("n_group", lambda: ops.route_topk(logits, 2, n_group=2), ValueError, "n_group"),
        ("bias shape", lambda: ops.route_topk(logits, 2, correction_bias=torch.zeros(4)), ValueError, "correction_bias"),
        ("ids range", lambda: ops.moe_plan(ids + 5, 5), ValueError, "ids"),
        ("negative ids", lambda: ops.moe_plan(ids - 9, 5), ValueError, "ids"),
        ("ids dtype", lambda: ops.moe_plan(ids.float(), 5), TypeError, "ids"),
        ("num_experts", lambda: ops.moe_plan(ids, 0), ValueError, "num_experts"),
        ("permute tokens", lambda: ops.permute(x[:3], plan), ValueError, "x"),
        ("plan type", lambda: ops.permute(x, (1, 2)), TypeError, "plan"),
        ("combine weights", lambda: ops.combine(torch.randn(18, 6), plan, weights[:, :1]), ValueError, "weights"),
        ("combine rows", lambda: ops.combine(torch.randn(3, 6), plan, weights), ValueError, "y_sorted"),
        ("gmm K", lambda: ops.grouped_mm(torch.randn(18, 7), wgu, plan.offsets), ValueError, "w"),
        ("gmm offsets", lambda: ops.grouped_mm(torch.randn(18, 6), wgu, torch.tensor([0, 5, 3, 9, 9, 18])), ValueError,
         "offsets"),
        ("gmm offsets past rows", lambda: ops.grouped_mm(torch.randn(18, 6), wgu, torch.tensor([0, 5, 6, 9, 9, 19])),
         ValueError, "offsets"),
        ("gmm activation", lambda: ops.grouped_mm(torch.randn(18, 6), wgu, plan.offsets, activation="relu"), ValueError,
         "activation"),
        ("fe w_down", lambda: ops.fused_experts(x, wgu, wd[:, :, :3], weights, ids), ValueError, "w_down"),
        ("fe w_gate_up", lambda: ops.fused_experts(x, wgu[:, :, :5], wd, weights, ids), ValueError, "w_gate_up"),
        ("fe ids range", lambda: ops.fused_experts(x, wgu, wd, weights, ids + 4), ValueError, "ids"),
        ("fe ids shape", lambda: ops.fused_experts(x, wgu, wd, weights, ids[:, :1]), ValueError, "ids"),
        ("fe weights rows", lambda: ops.fused_experts(x, wgu, wd, weights[:4], ids[:4]), ValueError, "weights"),
        ("fe activation", lambda: ops.fused_experts(x, wgu, wd, weights, ids, activation="tanh"), ValueError,
         "activation"),
        ("fe x rank", lambda: ops.fused_experts(x[None], wgu, wd, weights, ids), ValueError, "x"),
        ("aux ids rows", lambda: ops.moe_aux_loss(torch.rand(4, 5), ids), ValueError, "ids"),
        ("snp x rank", lambda: ops.stack_norm_project(torch.randn(4, 3), 2, w1=torch.randn(2, 6)), ValueError, "x"),
        ("snp k", lambda: ops.stack_norm_project(torch.randn(1, 4, 3), 0, w1=torch.randn(2, 6)), ValueError, "k"),
        ("snp w1", lambda: ops.stack_norm_project(torch.randn(1, 4, 3), 2, w1=torch.randn(2, 5)), ValueError, "w1"),
        ("snp lengths", lambda: ops.stack_norm_project(torch.randn(2, 4, 3), 2, w1=torch.randn(2, 6),
                                                       lengths=torch.tensor([4, 5])), ValueError, "lengths"),
        ("snp norm", lambda: ops.stack_norm_project(torch.randn(1, 4, 3), 2, norm="batch"), ValueError, "norm"),
        ("snp pool", lambda: ops.stack_norm_project(torch.randn(1, 4, 3), 2, pool="max"), ValueError, "pool"),
        ("snp swiglu odd", lambda: ops.stack_norm_project(torch.randn(1, 4, 3), 2, w1=torch.randn(5, 6),
                                                          activation="swiglu"), ValueError, "swiglu"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    _, fn, exc, word = case
    with pytest.raises(exc, match=word):
        fn()


@compiled
def test_kernels_reject_bad_indices_directly():
    """The C++ kernels bounds-check too (for callers that bypass the Python API)."""
    x, wgu, wd, weights, ids = _moe_inputs()
    with pytest.raises(RuntimeError, match="ids"):
        OPS.fused_experts(x, wgu, wd, weights, ids + 5, "silu")
    with pytest.raises(RuntimeError, match="sorted_rows"):
        OPS.permute(x, torch.tensor([0, 99]), 2)
    with pytest.raises(RuntimeError, match="inverse_rows"):
        OPS.combine(torch.randn(18, 6), torch.full((18,), -1), weights)
    with pytest.raises(RuntimeError, match="offsets"):
        OPS.grouped_mm(torch.randn(18, 6), wgu, torch.tensor([0, 5, 6, 9, 9, 40]), "none")


def test_use_reference_path_matches():
    x, wgu, wd, weights, ids = _moe_inputs()
    out = ops.fused_experts(x, wgu, wd, weights, ids, use_reference=True)
    torch.testing.assert_close(out, ops.fused_experts(x, wgu, wd, weights, ids), atol=1e-5, rtol=1e-4)


def test_fallback_without_extension_warns_once_and_runs_references():
    code = (
        "import sys, warnings\n"
        "sys.modules['eureka_fast._C'] = None\n"  # makes `from .. import _C` raise ImportError
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, eureka_fast.ops as ops\n"  # the kernels load (and the warning fires) at import
        "    assert ops.backend() == 'reference'\n"
        "    w, ids = ops.route_topk(torch.randn(4, 6), 2)\n"
        "    ops.fused_experts(torch.randn(4, 3), torch.randn(6, 4, 3), torch.randn(6, 3, 2), w, ids)\n"
        "msgs = [str(c.message) for c in caught if 'compiled kernels not available' in str(c.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
