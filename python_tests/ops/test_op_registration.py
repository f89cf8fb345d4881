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
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torch_compile_fullgraph_moe_layer(dynamic):
    """fullgraph=True fails on any graph break; dynamic=True traces the token count (and float arguments)
    symbolically, which is where Python-side value checks (math.isfinite, bool(tensor)) used to break the graph.
    Forward and backward against eager, at two token counts (the second reuses the dynamic graph)."""
    torch.manual_seed(0)
    layer = TinyMoE()
    compiled_layer = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for T in (20, 13):
        x = torch.randn(T, 16, requires_grad=True)
        eager_out, eager_aux = layer(x)
        out, aux = compiled_layer(x)
        torch.testing.assert_close(out, eager_out)
        torch.testing.assert_close(aux, eager_aux)
        layer.zero_grad()
        (out.sum() + aux).backward()
        g_compiled = [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad()
        (eager_out.sum() + eager_aux).backward()
        for g, p in zip(g_compiled, layer.parameters()):
            torch.testing.assert_close(g, p.grad)


def _every_moe_op(x, logits, w_gate_up, w_down, bias, scaling):
    """Every MoE op's Python wrapper in one function: softmax routing into the unfused pipeline
    (moe_plan -> permute -> grouped_mm x2 -> combine), DeepSeek routing (sigmoid, correction_bias, groups, a float
    routed_scaling argument) into fused_experts, and the aux loss."""
    weights, ids = ops.route_topk(logits, 2, renormalize=True)
    plan = ops.moe_plan(ids, w_gate_up.shape[0], block=4)
    h = ops.grouped_mm(ops.permute(x, plan), w_gate_up, plan.offsets, activation="silu_mul")
    unfused = ops.combine(ops.grouped_mm(h, w_down, plan.offsets), plan, weights)
    w2, ids2 = ops.route_topk(logits, 3, scoring="sigmoid", renormalize=False, correction_bias=bias, n_group=2,
                              topk_group=1, routed_scaling=scaling)
    fused = ops.fused_experts(x, w_gate_up, w_down, w2, ids2, activation="gelu")
    aux = ops.moe_aux_loss(torch.softmax(logits, -1), ids)
    return unfused, fused, aux, w2, ids2, plan.padded_offsets


@compiled
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_every_moe_op_compiles_fullgraph(dynamic):
    gen = torch.Generator().manual_seed(2)
    E, H, I = 8, 6, 4
    w_gate_up = torch.randn(E, 2 * I, H, generator=gen) * 0.3
    w_down = torch.randn(E, H, I, generator=gen) * 0.3
    bias = torch.randn(E, generator=gen) * 0.1
    fn = torch.compile(_every_moe_op, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for T, scaling in ((11, 2.5), (17, 2.5), (0, 1.0)):  # T = 0: empty outputs, compiled too
        x, logits = torch.randn(T, H, generator=gen), torch.randn(T, E, generator=gen)
        for got, want in zip(fn(x, logits, w_gate_up, w_down, bias, scaling),
                             _every_moe_op(x, logits, w_gate_up, w_down, bias, scaling)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@compiled
def test_compiled_graph_still_rejects_bad_values():
    """The Python value checks are skipped inside a trace; the kernels' own checks still raise at run time."""
    x, wgu, wd, weights, ids = _moe_inputs()

    def route(logits, bias, scaling):
        return ops.route_topk(logits, 2, scoring="sigmoid", correction_bias=bias, routed_scaling=scaling)

    def experts(ids):
        return ops.fused_experts(x, wgu, wd, weights, ids)

    route_c = torch.compile(route, fullgraph=True, backend="aot_eager", dynamic=True)
    experts_c = torch.compile(experts, fullgraph=True, backend="aot_eager", dynamic=True)
    logits, bias = torch.randn(9, 5), torch.zeros(5)
    torch.testing.assert_close(route_c(logits, bias, 2.0), route(logits, bias, 2.0))
    with pytest.raises(RuntimeError, match="logits contain NaN"):
        route_c(torch.full((9, 5), float("nan")), bias, 2.0)
    with pytest.raises(RuntimeError, match="correction_bias contains NaN"):
        route_c(logits, torch.tensor([0.0, float("inf"), 0.0, 0.0, 0.0]), 2.0)
    with pytest.raises(RuntimeError, match="routed_scaling must be a finite number"):
        route_c(logits, bias, float("nan"))
    torch.testing.assert_close(experts_c(ids), experts(ids))
    with pytest.raises(RuntimeError, match="ids must lie in"):
        experts_c(ids + 5)


@compiled
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_moe_plan_pieces_compile(dynamic):
    def pipeline(x, ids, weights, w):
        plan = ops.moe_plan(ids, w.shape[0])
        y = ops.grouped_mm(ops.permute(x, plan), w, plan.offsets, activation="silu_mul")
        return ops.combine(y, plan, weights)

    x, wgu, _, weights, ids = _moe_inputs()
    want = pipeline(x, ids, weights, wgu)
    got = torch.compile(pipeline, fullgraph=True, backend="aot_eager", dynamic=dynamic)(x, ids, weights, wgu)
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
        ("fe k=0", lambda: ops.fused_experts(x, wgu, wd, weights[:, :0], ids[:, :0]), ValueError,
         r"weights and ids must have between 1 and 5 columns.*got k = 0"),
        ("fe k=0 T=0", lambda: ops.fused_experts(x[:0], wgu, wd, weights[:0, :0], ids[:0, :0]), ValueError,
         r"weights and ids must have between 1 and 5 columns.*got k = 0"),
        ("fe k>E", lambda: ops.fused_experts(x, wgu, wd, torch.rand(9, 6), torch.zeros(9, 6, dtype=torch.int32)),
         ValueError, r"weights and ids must have between 1 and 5 columns.*got k = 6"),
        ("fe weights dtype", lambda: ops.fused_experts(x, wgu, wd, weights.long(), ids), TypeError, "weights"),
        ("fe ids dtype", lambda: ops.fused_experts(x, wgu, wd, weights, ids.float()), TypeError, "ids"),
        ("fe device", lambda: ops.fused_experts(x, wgu.to("meta"), wd, weights, ids), ValueError,
         "w_gate_up is on meta"),
        ("aux ids rows", lambda: ops.moe_aux_loss(torch.rand(4, 5), ids), ValueError, "ids"),
        ("aux k=0", lambda: ops.moe_aux_loss(torch.rand(9, 5), ids[:, :0]), ValueError,
         r"ids must have between 1 and 5 columns.*got k = 0"),
        ("aux k>E", lambda: ops.moe_aux_loss(torch.rand(9, 5), torch.zeros(9, 6, dtype=torch.int32)), ValueError,
         r"ids must have between 1 and 5 columns.*got k = 6"),
        ("aux probs dtype", lambda: ops.moe_aux_loss(torch.ones(9, 5, dtype=torch.long), ids), TypeError,
         "router_probs"),
        ("aux ids range", lambda: ops.moe_aux_loss(torch.rand(9, 5), ids + 5), ValueError, r"ids must lie in \[0, 5\)"),
        ("plan k=0", lambda: ops.moe_plan(ids[:, :0], 5), ValueError, r"ids must have between 1 and 5 columns.*k = 0"),
        ("plan k=0 T=0", lambda: ops.moe_plan(ids[:0, :0], 5), ValueError, r"ids must have between 1 and 5 columns"),
        ("plan k>E", lambda: ops.moe_plan(torch.zeros(9, 3, dtype=torch.int32), 2), ValueError,
         r"ids must have between 1 and 2 columns.*k = 3"),
        ("plan block", lambda: ops.moe_plan(ids, 5, block=-1), ValueError, "block"),
        ("nan bias", lambda: ops.route_topk(logits, 2, scoring="sigmoid",
                                            correction_bias=torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0])),
         ValueError, "correction_bias contains NaN or infinite"),
        ("inf bias", lambda: ops.route_topk(logits, 2, correction_bias=torch.full((5,), float("-inf"))), ValueError,
         "correction_bias contains NaN or infinite"),
        ("bias dtype", lambda: ops.route_topk(logits, 2, correction_bias=torch.zeros(5, dtype=torch.long)), TypeError,
         "correction_bias"),
        ("inf logits", lambda: ops.route_topk(torch.tensor([[0.0, float("inf"), 1.0]]), 1), ValueError,
         "logits contain NaN or infinite"),
        ("renormalize str", lambda: ops.route_topk(logits, 2, renormalize="yes"), TypeError,
         "renormalize must be a bool, got str"),
        ("renormalize int", lambda: ops.route_topk(logits, 2, renormalize=1), TypeError,
         "renormalize must be a bool, got int"),
        ("renormalize None", lambda: ops.route_topk(logits, 2, renormalize=None), TypeError,
         "renormalize must be a bool"),
        ("routed_scaling nan", lambda: ops.route_topk(logits, 2, routed_scaling=float("nan")), ValueError,
         "routed_scaling must be a finite number"),
        ("routed_scaling inf", lambda: ops.route_topk(logits, 2, routed_scaling=float("inf")), ValueError,
         "routed_scaling must be a finite number"),
        ("routed_scaling str", lambda: ops.route_topk(logits, 2, routed_scaling="2"), ValueError,
         "routed_scaling must be a finite number"),
        ("topk_group", lambda: ops.route_topk(torch.randn(3, 8), 2, n_group=2, topk_group=3), ValueError,
         "topk_group"),
        ("k > kept groups", lambda: ops.route_topk(torch.randn(3, 8), 5, n_group=4, topk_group=2), ValueError,
         "kept groups"),
        ("permute x rank", lambda: ops.permute(x[0], plan), ValueError, "x must have 2 dimensions"),
        ("permute device", lambda: ops.permute(x.to("meta"), plan), ValueError, "is on"),
        ("combine k=0", lambda: ops.combine(torch.randn(18, 6), plan, weights[:, :0]), ValueError,
         r"weights must have shape \[T, k\] with k >= 1"),
        ("combine tokens", lambda: ops.combine(torch.randn(18, 6), plan, weights[:4]), ValueError, "weights"),
        ("combine y dtype", lambda: ops.combine(torch.ones(18, 6, dtype=torch.long), plan, weights), TypeError,
         "y_sorted"),
        ("combine weights dtype", lambda: ops.combine(torch.randn(18, 6), plan, weights.long()), TypeError,
         "weights"),
        ("combine y rank", lambda: ops.combine(torch.randn(18), plan, weights), ValueError, "y_sorted"),
        ("gmm a dtype", lambda: ops.grouped_mm(torch.ones(18, 6, dtype=torch.long), wgu, plan.offsets), TypeError,
         "a must be a floating-point"),
        ("gmm w rank", lambda: ops.grouped_mm(torch.randn(18, 6), wgu[0], plan.offsets), ValueError,
         "w must have 3 dimensions"),
        ("gmm offsets dtype", lambda: ops.grouped_mm(torch.randn(18, 6), wgu, plan.offsets.float()), TypeError,
         "offsets must be an integer"),
        ("gmm offsets length", lambda: ops.grouped_mm(torch.randn(18, 6), wgu, plan.offsets[:-1]), ValueError,
         r"offsets must have shape \[6\]"),
        ("gmm negative offset", lambda: ops.grouped_mm(torch.randn(18, 6), wgu, torch.tensor([-1, 5, 6, 9, 9, 18])),
         ValueError, "offsets must be non-decreasing from >= 0"),
        ("gmm odd N gated", lambda: ops.grouped_mm(torch.randn(18, 6), wgu[:, :7], plan.offsets,
                                                   activation="silu_mul"), ValueError, "even N"),
        ("gmm device", lambda: ops.grouped_mm(torch.randn(18, 6), wgu.to("meta"), plan.offsets), ValueError,
         "w is on meta"),
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


def _bad_kernel_calls():
    """Bad arguments straight to torch.ops.eureka_fast.* (no Python wrapper in front): (name, call, message)."""
    x, wgu, wd, weights, ids = _moe_inputs()
    i32 = dict(dtype=torch.int32)
    nan, inf = float("nan"), float("inf")
    return [
        ("fe k=0", lambda: OPS.fused_experts(x, wgu, wd, weights[:, :0], ids[:, :0], "silu"),
         r"weights and ids must have between 1 and 5 columns.*got k = 0"),
        ("fe k=0 T=0", lambda: OPS.fused_experts(x[:0], wgu, wd, weights[:0, :0], ids[:0, :0], "silu"),
         r"weights and ids must have between 1 and 5 columns.*got k = 0"),
        ("fe k>E", lambda: OPS.fused_experts(x, wgu, wd, torch.rand(9, 6), torch.zeros(9, 6, **i32), "silu"),
         r"weights and ids must have between 1 and 5 columns.*got k = 6"),
        ("fe ids shape", lambda: OPS.fused_experts(x, wgu, wd, weights, ids[:, :1], "silu"), "ids must have the shape"),
        ("fe w_down", lambda: OPS.fused_experts(x, wgu, wd[:, :, :3], weights, ids, "silu"), "w_down must have shape"),
        ("fe activation", lambda: OPS.fused_experts(x, wgu, wd, weights, ids, "relu"), "activation must be"),
        ("aux k=0", lambda: OPS.moe_aux_loss(torch.rand(9, 5), ids[:, :0]),
         r"ids must have between 1 and 5 columns.*got k = 0"),
        ("aux k>E", lambda: OPS.moe_aux_loss(torch.rand(9, 5), torch.zeros(9, 6, **i32)),
         r"ids must have between 1 and 5 columns.*got k = 6"),
        ("aux ids range", lambda: OPS.moe_aux_loss(torch.rand(9, 5), ids + 5), "ids must lie in"),
        ("plan k=0", lambda: OPS.moe_plan(ids[:, :0], 5, 0), r"ids must have between 1 and 5 columns.*got k = 0"),
        ("plan k>E", lambda: OPS.moe_plan(torch.zeros(9, 3, **i32), 2, 0),
         r"ids must have between 1 and 2 columns.*got k = 3"),
        ("plan ids range", lambda: OPS.moe_plan(ids - 9, 5, 0), "ids must lie in"),
        ("plan num_experts", lambda: OPS.moe_plan(ids, 0, 0), "num_experts must be >= 1"),
        ("route k=0", lambda: OPS.route_topk(torch.randn(9, 5), 0, "softmax", False, None, 1, 1, 1.0), "k must lie in"),
        ("route k>E", lambda: OPS.route_topk(torch.randn(9, 5), 6, "softmax", False, None, 1, 1, 1.0),
         "k must lie in"),
        ("route nan logits", lambda: OPS.route_topk(torch.tensor([[0.0, 1.0], [nan, 0.0]]), 1, "softmax", False, None,
                                                    1, 1, 1.0),
         r"logits contain NaN or infinite values \(first in row 1\)"),
        # all-NaN rows with k > 16 (partial-sort selection) and k <= 16 (insertion selection)
        ("route all-nan logits k=20", lambda: OPS.route_topk(torch.full((3, 40), nan), 20, "sigmoid", False, None, 1, 1,
                                                             1.0), "logits contain NaN"),
        ("route inf logits", lambda: OPS.route_topk(torch.tensor([[-inf, 0.0, 1.0]]), 2, "softmax", True, None, 1, 1,
                                                    1.0), "logits contain NaN or infinite"),
        ("route nan bias", lambda: OPS.route_topk(torch.randn(4, 8), 2, "sigmoid", False,
                                                  torch.tensor([0.0, 0.0, nan, 0, 0, 0, 0, 0]), 2, 1, 1.0),
         r"correction_bias contains NaN or infinite values \(nan at expert 2\)"),
        ("route int bias", lambda: OPS.route_topk(torch.randn(4, 8), 2, "sigmoid", False,
                                                  torch.zeros(8, dtype=torch.long), 1, 1, 1.0),
         "correction_bias must be a floating-point tensor"),
        ("route bias shape", lambda: OPS.route_topk(torch.randn(4, 8), 2, "sigmoid", False, torch.zeros(7), 1, 1, 1.0),
         r"correction_bias must have shape \[8\]"),
        ("route routed_scaling", lambda: OPS.route_topk(torch.randn(4, 8), 2, "sigmoid", False, None, 1, 1, inf),
         "routed_scaling must be a finite number"),
        ("route scoring", lambda: OPS.route_topk(torch.randn(4, 8), 2, "relu", False, None, 1, 1, 1.0), "scoring"),
        ("route n_group", lambda: OPS.route_topk(torch.randn(4, 8), 2, "sigmoid", False, None, 3, 1, 1.0), "n_group"),
        ("permute rows range", lambda: OPS.permute(x, torch.tensor([0, 99]), 2), "sorted_rows must lie in"),
        ("permute rows count", lambda: OPS.permute(x, torch.arange(17), 2),
         r"sorted_rows must have T\*top_k = 18 entries"),
        ("permute top_k", lambda: OPS.permute(x, torch.zeros(0, dtype=torch.long), 0), "top_k must be >= 1"),
        ("permute rows dtype", lambda: OPS.permute(x, torch.arange(18.0), 2), "sorted_rows must be an integer"),
        ("combine inverse range", lambda: OPS.combine(torch.randn(18, 6), torch.full((18,), -1), weights),
         "inverse_rows must lie in"),
        ("combine inverse count", lambda: OPS.combine(torch.randn(18, 6), torch.arange(17), weights),
         r"inverse_rows must have T\*k = 18 entries"),
        ("combine k=0", lambda: OPS.combine(torch.randn(18, 6), torch.zeros(0, dtype=torch.long), weights[:, :0]),
         r"weights must have shape \[T, k\] with k >= 1"),
        ("combine y dtype", lambda: OPS.combine(torch.ones(18, 6, dtype=torch.long), torch.arange(18), weights),
         "y_sorted must be a floating-point"),
        ("gmm offsets past rows", lambda: OPS.grouped_mm(torch.randn(18, 6), wgu, torch.tensor([0, 5, 6, 9, 9, 40]),
                                                         "none"), "offsets"),
        ("gmm offsets decreasing", lambda: OPS.grouped_mm(torch.randn(18, 6), wgu, torch.tensor([0, 5, 3, 9, 9, 18]),
                                                          "none"), "offsets must be non-decreasing"),
        ("gmm negative offset", lambda: OPS.grouped_mm(torch.randn(18, 6), wgu, torch.tensor([-2, 5, 6, 9, 9, 18]),
                                                       "none"), r"offsets\[0\] must be >= 0"),
        ("gmm offsets length", lambda: OPS.grouped_mm(torch.randn(18, 6), wgu, torch.tensor([0, 18]), "none"),
         r"offsets must have shape \[6\]"),
        ("gmm K", lambda: OPS.grouped_mm(torch.randn(18, 7), wgu, torch.tensor([0, 5, 6, 9, 9, 18]), "none"),
         "w must have shape"),
        ("gmm odd N", lambda: OPS.grouped_mm(torch.randn(18, 6), wgu[:, :7], torch.tensor([0, 5, 6, 9, 9, 18]),
                                             "silu_mul"), "even N"),
        ("gmm activation", lambda: OPS.grouped_mm(torch.randn(18, 6), wgu, torch.tensor([0, 5, 6, 9, 9, 18]), "relu"),
         "activation must be"),
        ("gmm backward grad_out", lambda: OPS.grouped_mm_backward(torch.randn(18, 3), torch.randn(18, 6), wgu,
                                                                  torch.tensor([0, 5, 6, 9, 9, 18]), "none"),
         r"grad_out must have shape \[18, 8\]"),
    ]


@compiled
@pytest.mark.parametrize("case", _bad_kernel_calls() if OPS is not None else [], ids=lambda c: c[0])
def test_kernels_reject_bad_arguments_directly(case):
    """Every check of the Python API is repeated in the kernel (direct callers, compiled graphs): a RuntimeError
    naming the argument, no crash."""
    _, fn, message = case
    with pytest.raises(RuntimeError, match=message):
        fn()


@compiled
def test_zero_tokens_work_everywhere():
    """T = 0 is not an error anywhere (only k < 1 or k > E is): empty outputs of the right shapes, through the API
    and straight through the kernels, forward and backward."""
    E, H, I, k = 5, 6, 4, 2
    x = torch.randn(0, H, requires_grad=True)
    logits = torch.randn(0, E, requires_grad=True)
    wgu = torch.randn(E, 2 * I, H, requires_grad=True)
    wd = torch.randn(E, H, I, requires_grad=True)
    weights, ids = ops.route_topk(logits, k, renormalize=True)
    assert weights.shape == (0, k) and ids.shape == (0, k)
    w2, ids2 = ops.route_topk(logits, k, scoring="sigmoid", correction_bias=torch.zeros(E), n_group=5, topk_group=2)
    assert w2.shape == (0, k) and ids2.shape == (0, k)
    plan = ops.moe_plan(ids, E, block=4)
    assert plan.counts.tolist() == [0] * E and plan.padded_offsets.tolist() == [0] * (E + 1)
    assert plan.sorted_rows.shape == (0,) and plan.inverse_rows.shape == (0,)
    xs = ops.permute(x, plan)
    assert xs.shape == (0, H)
    h = ops.grouped_mm(xs, wgu, plan.offsets, activation="silu_mul")
    assert h.shape == (0, I)
    out = ops.combine(ops.grouped_mm(h, wd, plan.offsets), plan, weights)
    assert out.shape == (0, H)
    fused = ops.fused_experts(x, wgu, wd, weights, ids)
    assert fused.shape == (0, H)
    aux = ops.moe_aux_loss(torch.softmax(logits, -1), ids)
    assert aux.shape == () and float(aux.detach()) == 0.0
    (out.sum() + fused.sum() + aux).backward()
    assert x.grad.shape == (0, H) and logits.grad.shape == (0, E)
    assert bool((wgu.grad == 0).all()) and bool((wd.grad == 0).all())
    # the raw kernels
    i32 = torch.zeros(0, k, dtype=torch.int32)
    assert OPS.fused_experts(x.detach(), wgu.detach(), wd.detach(), torch.rand(0, k), i32, "gelu").shape == (0, H)
    assert OPS.moe_plan(i32, E, 0)[3].shape == (0,)
    assert float(OPS.moe_aux_loss(torch.rand(0, E), i32)) == 0.0
    assert OPS.route_topk(torch.randn(0, E), k, "softmax", False, None, 1, 1, 1.0)[1].shape == (0, k)


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
