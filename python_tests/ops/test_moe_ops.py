"""The MoE ops against the pure-PyTorch references (and, for fused_experts, a second dense reference and the real
transformers expert modules) over the case matrix of docs/ops.md#how-the-ops-are-tested."""
import math

import pytest
import torch
import torch.nn.functional as F

import eureka_fast.ops as ops
from eureka_fast.ops import reference as ref

pytestmark = [
    pytest.mark.skipif(ops.backend() != "compiled", reason="eureka_fast._C is not built"),
    pytest.mark.usefixtures("poisoned_empty_tensors"),
]

FP32 = dict(atol=1e-5, rtol=1e-4)
BF16 = dict(atol=2e-2, rtol=2e-2)


def make_ids(T, E, k, routing, gen):
    """Routed expert ids [T, k] (distinct per token) for uniform, skewed (Zipf-like) or all-to-one routing."""
    if T == 0:
        return torch.zeros(0, k, dtype=torch.int32)
    if routing == "uniform":
        scores = torch.rand(T, E, generator=gen)
    elif routing == "skewed":
        scores = torch.rand(T, E, generator=gen) * (1.0 / torch.arange(1, E + 1)) ** 2
    elif routing == "all_to_one":  # the same k experts (0..k-1) for every token, expert 0 in slot 0
        scores = torch.zeros(T, E)
        scores[:, :k] = torch.arange(k, 0, -1, dtype=torch.float32)
    else:
        raise ValueError(routing)
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].to(torch.int32)


def expert_weights(E, H, I, dtype=torch.float32, gen=None, scale=0.3):
    w_gate_up = (torch.randn(E, 2 * I, H, generator=gen) * scale / math.sqrt(H)).to(dtype)
    w_down = (torch.randn(E, H, I, generator=gen) * scale / math.sqrt(I)).to(dtype)
    return w_gate_up, w_down


# --------------------------------------------------------------------------------------------------------------
# route_topk
# --------------------------------------------------------------------------------------------------------------
ROUTE_CASES = sorted({(E, E if k == "E" else k) for E in (1, 2, 8, 60, 64, 128) for k in (1, 2, 8, "E")
                      if k == "E" or k <= E})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("E,k", ROUTE_CASES)
@pytest.mark.parametrize("T", [0, 1, 7, 33, 256])
def test_route_topk_softmax_case_matrix(E, k, T, dtype):
    """fp32 and bf16 logits (bf16: many exact ties between experts, all broken to the lower id). Weights are fp32
    either way, computed from the logits widened to fp32, so fp32 tolerances hold for both."""
    gen = torch.Generator().manual_seed(E * 1000 + k * 10 + T)
    logits = (torch.randn(T, E, generator=gen) * 3).to(dtype)
    for renormalize in (False, True):
        w, ids = ops.route_topk(logits, k, renormalize=renormalize)
        rw, rids = ref.route_topk(logits, k, "softmax", renormalize)
        assert ids.dtype == torch.int32 and w.dtype == torch.float32
        assert torch.equal(ids, rids)
        torch.testing.assert_close(w, rw, **FP32)
    if dtype == torch.bfloat16 and T:
        # independent of both: softmax is monotone, so the top k are a stable descending sort of the logits
        assert torch.equal(ids.long(), torch.sort(-logits.float(), dim=1, stable=True).indices[:, :k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_route_topk_sigmoid_grouped_deepseek(dtype):
    gen = torch.Generator().manual_seed(3)
    T, E = 97, 64
    logits = torch.randn(T, E, generator=gen).to(dtype)
    bias = torch.randn(E, generator=gen) * 0.1
    w, ids = ops.route_topk(logits, 8, scoring="sigmoid", renormalize=True, correction_bias=bias, n_group=8,
                            topk_group=4, routed_scaling=2.5)
    rw, rids = ref.route_topk(logits, 8, "sigmoid", True, bias, 8, 4, 2.5)
    assert torch.equal(ids, rids)
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(w, rw, **FP32)
    # the selected experts come from at most topk_group = 4 of the 8 groups
    assert int((ids.long() // 8).sort(1).values.diff(dim=1).ne(0).sum(1).max()) <= 3
    # the bias shifts the selection only: weights are the plain sigmoid scores, renormalised and scaled
    s = torch.sigmoid(logits.float()).gather(1, ids.long())
    torch.testing.assert_close(w.float(), 2.5 * s / s.sum(1, keepdim=True), **FP32)


def test_route_topk_ties_go_to_lower_id():
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    _, ids = ops.route_topk(logits, 3)
    assert ids.tolist() == [[1, 2, 3], [0, 1, 2]]
    _, ids = ops.route_topk(logits, 2, scoring="sigmoid", correction_bias=torch.tensor([0.0, 0.0, 0.0, 0.5, 0.0]))
    assert ids.tolist() == [[3, 1], [3, 0]]


@pytest.mark.parametrize("E,k", [(8, 1), (8, 8), (64, 5), (64, 16), (64, 17), (100, 16), (100, 40), (100, 100)])
def test_route_topk_many_ties_match_stable_sort(E, k):
    """Logits from only four values: every rank is a tie between many experts, so the whole order comes from the
    tie rule (lower id first). Covers the small-k insertion selection (k <= 16) and the partial sort above it."""
    gen = torch.Generator().manual_seed(E + k)
    logits = torch.randint(0, 4, (50, E), generator=gen).float()
    for scoring in ("softmax", "sigmoid"):
        w, ids = ops.route_topk(logits, k, scoring=scoring)
        rw, rids = ref.route_topk(logits, k, scoring)
        assert torch.equal(ids, rids)
        torch.testing.assert_close(w, rw, **FP32)
        expected = torch.sort(-logits, dim=1, stable=True).indices[:, :k]  # independent: stable descending sort
        assert torch.equal(ids.long(), expected)


def test_route_topk_gradient_matches_reference_autograd():
    gen = torch.Generator().manual_seed(5)
    for scoring, renorm in (("softmax", False), ("softmax", True), ("sigmoid", True)):
        logits = torch.randn(19, 12, generator=gen, requires_grad=True)
        upstream = torch.randn(19, 3, generator=gen)
        w, _ = ops.route_topk(logits, 3, scoring=scoring, renormalize=renorm, routed_scaling=1.5)
        (g,) = torch.autograd.grad((w * upstream).sum(), logits)
        lr = logits.detach().clone().requires_grad_()
        rw, _ = ref.route_topk(lr, 3, scoring, renorm, None, 1, 1, 1.5)
        (rg,) = torch.autograd.grad((rw * upstream).sum(), lr)
        torch.testing.assert_close(g, rg, atol=1e-6, rtol=1e-5)


def test_route_topk_gradcheck_fp64():
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: ops.route_topk(l, 2, renormalize=True)[0], (logits,))
    assert torch.autograd.gradcheck(lambda l: ops.route_topk(l, 3, scoring="sigmoid")[0], (logits,))


# --------------------------------------------------------------------------------------------------------------
# moe_plan, permute, combine
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("E,k", [(1, 1), (2, 2), (8, 2), (60, 4), (64, 8), (128, 8), (8, 8)])
@pytest.mark.parametrize("T", [0, 1, 7, 33, 4096])
@pytest.mark.parametrize("routing", ["uniform", "skewed", "all_to_one"])
def test_moe_plan_exact_and_invariants(E, k, T, routing):
    ids = make_ids(T, E, k, routing, torch.Generator().manual_seed(T + E))
    for block in (0, 16):
        plan = ops.moe_plan(ids, E, block=block)
        expected = ref.moe_plan(ids, E, block)
        for got, want in zip(plan[:5], expected):
            assert got.dtype == torch.int64
            assert torch.equal(got, want)
        assert int(plan.counts.sum()) == T * k
        assert torch.equal(plan.sorted_rows[plan.inverse_rows], torch.arange(T * k))
        if block:
            assert bool((plan.padded_offsets % block == 0).all())
        assert plan.top_k == k and plan.num_experts == E


@pytest.mark.parametrize("routing", ["uniform", "skewed", "all_to_one"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,H,E,k", [(0, 5, 4, 2), (1, 7, 4, 4), (33, 13, 8, 2), (256, 64, 60, 8), (45, 9, 1, 1)])
def test_permute_and_combine_match_reference(dtype, T, H, E, k, routing):
    """Every routing pattern (all-to-one: experts 0..k-1 take every row, the rest none) with contiguous and
    non-contiguous inputs: x every other column of a wider tensor or column-major, y_sorted rows strided inside a
    wider buffer or column-major, weights a transposed view."""
    gen = torch.Generator().manual_seed(T * 7 + H)
    ids = make_ids(T, E, k, routing, gen)
    plan = ops.moe_plan(ids, E)
    x = torch.randn(T, H, generator=gen).to(dtype)
    want_xs = ref.permute(x, plan.sorted_rows, k)
    assert torch.equal(want_xs, x[plan.sorted_rows // k])  # the reference itself, against plain indexing
    x_strided = torch.zeros(T, 2 * H, dtype=dtype)[:, ::2]  # every other column of a wider tensor
    x_strided.copy_(x)
    x_colmajor = x.t().contiguous().t()
    for xin in (x, x_strided, x_colmajor):
        assert torch.equal(ops.permute(xin, plan), want_xs)
    weights = torch.rand(T, k, generator=gen)
    y = torch.randn(T * k, H, generator=gen).to(dtype)
    want = ref.combine(y, plan.inverse_rows, weights)
    tol = FP32 if dtype == torch.float32 else BF16
    y_strided = torch.full((T * k, H + 3), float("nan"), dtype=dtype)[:, 1:H + 1]
    y_strided.copy_(y)
    w_t = weights.t().contiguous().t()
    for yin, win in ((y, weights), (y_strided, weights), (y.t().contiguous().t(), w_t)):
        out = ops.combine(yin, plan, win)
        assert out.dtype == dtype and out.shape == (T, H)
        torch.testing.assert_close(out, want, **tol)


@pytest.mark.parametrize("H", [1, 15, 16, 17, 63, 64, 65, 100, 130, 1024])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_combine_fp32_against_float64(H, k):
    """fp32 combine (AVX-512 copy: 64 columns in registers, masked tails) against a float64 sum in slot order, with
    y rows strided inside a wider buffer and a NaN in one row that must reach exactly the tokens that route to it."""
    gen = torch.Generator().manual_seed(H * 10 + k)
    T, E = 37, 9
    plan = ops.moe_plan(make_ids(T, E, k, "uniform", gen), E)
    y = torch.randn(T * k, H + 5, generator=gen)[:, 2:H + 2]
    weights = torch.rand(T, k, generator=gen)
    out = ops.combine(y, plan, weights)
    rows = y.double()[plan.inverse_rows.view(T, k)]  # [T, k, H]
    want = torch.zeros(T, H, dtype=torch.float64)
    for j in range(k):
        want += weights.double()[:, j:j + 1] * rows[:, j]
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    bad = int(plan.inverse_rows[5 * k])  # token 5's first slot
    y_nan = y.clone()
    y_nan[bad, H // 2] = float("nan")
    out_nan = ops.combine(y_nan, plan, weights)
    hit = (plan.inverse_rows.view(T, k) == bad).any(1)
    assert bool(out_nan[hit, H // 2].isnan().all())
    assert not bool(out_nan[~hit].isnan().any()) and not bool(out_nan[:, : H // 2].isnan().any())
    assert torch.equal(out_nan[~hit], out[~hit])


def test_permute_combine_gradients():
    gen = torch.Generator().manual_seed(11)
    T, H, E, k = 21, 10, 6, 3
    plan = ops.moe_plan(make_ids(T, E, k, "skewed", gen), E)
    x = torch.randn(T, H, generator=gen, requires_grad=True)
    weights = torch.rand(T, k, generator=gen, requires_grad=True)
    scale = torch.randn(T * k, H, generator=gen)
    upstream = torch.randn(T, H, generator=gen)
    out = ops.combine(ops.permute(x, plan) * scale, plan, weights)
    gx, gw = torch.autograd.grad((out * upstream).sum(), (x, weights))
    xr, wr = x.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    outr = ref.combine(ref.permute(xr, plan.sorted_rows, k) * scale, plan.inverse_rows, wr)
    gxr, gwr = torch.autograd.grad((outr * upstream).sum(), (xr, wr))
    torch.testing.assert_close(gx, gxr, **FP32)
    torch.testing.assert_close(gw, gwr, **FP32)
    x64 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w64 = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    plan = ops.moe_plan(make_ids(5, 3, 2, "uniform", gen), 3)
    assert torch.autograd.gradcheck(lambda a, b: ops.combine(ops.permute(a, plan), plan, b), (x64, w64))


# --------------------------------------------------------------------------------------------------------------
# grouped_mm
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", [None, "silu_mul", "gelu_mul"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_matches_reference(activation, layout, dtype):
    gen = torch.Generator().manual_seed(13)
    S, K, N, E = 70, 19, 22, 6
    a = torch.randn(S, K, generator=gen).to(dtype)
    w = torch.randn(E, N, K, generator=gen) / math.sqrt(K)
    if layout == "transposed":  # [E, K, N] storage viewed as [E, N, K]
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    w = w.to(dtype)
    offsets = torch.tensor([0, 10, 10, 40, 41, 65, 65])  # empty experts and uncovered trailing rows
    out = ops.grouped_mm(a, w, offsets, activation=activation)
    want = ref.grouped_mm(a, w, offsets, activation or "none")
    assert out.shape == (S, N if activation is None else N // 2) and out.dtype == dtype
    torch.testing.assert_close(out, want, **(FP32 if dtype == torch.float32 else BF16))
    assert bool((out[65:] == 0).all())


@pytest.mark.parametrize("N", [9, 32])
def test_grouped_mm_every_small_row_count(N):
    """Expert e gets e rows (0..17): covers the few-rows streaming kernel, its partial row blocks and odd N."""
    gen = torch.Generator().manual_seed(15)
    E, K = 18, 37
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.arange(E).cumsum(0)])
    a = torch.randn(int(offsets[-1]), K, generator=gen)
    w = torch.randn(E, N, K, generator=gen)
    torch.testing.assert_close(ops.grouped_mm(a, w, offsets), ref.grouped_mm(a, w, offsets), **FP32)
    if N % 2 == 0:
        torch.testing.assert_close(ops.grouped_mm(a, w, offsets, activation="silu_mul"),
                                   ref.grouped_mm(a, w, offsets, "silu_mul"), **FP32)


@pytest.mark.parametrize("K", [16, 53, 1000])
def test_grouped_mm_few_rows_strided_weights(K):
    """The few-rows (weight-streaming) kernel: rows 1..17 per expert, N not a multiple of the 4-row weight block,
    K a multiple of 16 or with a masked tail, weight rows padded (row stride > K) so reads past a row would show."""
    gen = torch.Generator().manual_seed(19)
    E, N = 17, 23
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.arange(1, E + 1).cumsum(0)])
    a = torch.randn(int(offsets[-1]), K, generator=gen)
    storage = torch.full((E, N + 1, K + 7), float("nan"))
    storage[:, :N, :K] = torch.randn(E, N, K, generator=gen) / math.sqrt(K)
    w = storage[:, :N, :K]  # NaN padding after every row and after the last row of each expert
    torch.testing.assert_close(ops.grouped_mm(a, w, offsets), ref.grouped_mm(a, w, offsets), **FP32)
    w_even = storage[:, : N - 1, :K]
    torch.testing.assert_close(ops.grouped_mm(a, w_even, offsets, activation="silu_mul"),
                               ref.grouped_mm(a, w_even, offsets, "silu_mul"), **FP32)


def nan_tailed(shape, gen, scale=1.0, row_pad=0):
    """randn * scale of `shape` whose last dimension is the first shape[-1] of shape[-1] + row_pad columns (NaN
    padding after every row when row_pad > 0), carved from the front of a larger NaN buffer: reads past the tensor,
    or past a row, show up as NaN."""
    *lead, last = shape
    width = last + row_pad
    flat = torch.full((math.prod(lead) * width + 1024,), float("nan"))
    t = flat[: math.prod(lead) * width].view(*lead, width)[..., :last]
    t.copy_(torch.randn(*shape, generator=gen) * scale)
    return t


# rows per expert: the many-rows GEMM's odd counts. Past the full 32-row panels, m % 32 rows run as dot-product pairs
# (and a last single row) for m % 32 in 1..14 and 17..24 (33, 34, 45, 49, 56, 300 = two tiles of 150, 78), else as a
# zero-padded panel (47, 48, 57, 127, 255).
MANY_ROWS = [17, 31, 33, 0, 127, 129, 1, 255, 257, 16, 300, 34, 45, 47, 48, 49, 56, 57, 78]


@pytest.mark.parametrize("K,N", [(33, 7), (64, 30), (257, 15), (1000, 29), (1300, 14)])
@pytest.mark.parametrize("row_pad", [0, 5])
def test_grouped_mm_many_rows(K, N, row_pad):
    """The many-rows GEMM (17+ rows per tile on AVX-512): row counts around its 32-row panels and 16-row halves,
    N around its 14-row weight blocks, K around its 512-column blocks (1, 2 or 3 of them) and 16-column steps;
    NaN right after the input and weight tensors (and after every row when padded) to catch over-reads; float64
    reference."""
    gen = torch.Generator().manual_seed(K * 100 + N + row_pad)
    E = len(MANY_ROWS)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(MANY_ROWS).cumsum(0)])
    S = int(offsets[-1])
    a = nan_tailed((S, K), gen, row_pad=row_pad)
    for activation, n_rows in ((None, N), ("silu_mul", 2 * N), ("gelu_mul", 2 * N)):
        w = nan_tailed((E, n_rows, K), gen, scale=1 / math.sqrt(K), row_pad=row_pad)
        out = ops.grouped_mm(a, w, offsets, activation=activation)
        want = ref.grouped_mm(a.double(), w.double(), offsets, activation or "none")
        assert out.dtype == torch.float32 and not bool(out.isnan().any())
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_grouped_mm_narrower_instruction_sets(isa):
    """EUREKA_FAST_CPU_ISA caps the hand-vectorised kernels, so the AVX2 and portable copies (and the BLAS for the
    row counts the AVX-512 many-rows GEMM takes otherwise) stay tested on an AVX-512 machine (the variable is read
    once per process, hence the subprocess)."""
    import os
    import subprocess
    import sys

    code = (
        "import math, torch\n"
        "import eureka_fast.ops as ops\n"
        "from eureka_fast.ops import reference as ref\n"
        "g = torch.Generator().manual_seed(3)\n"
        "for K, rows in ((37, list(range(1, 18))), (64, list(range(1, 18))), (257, [17, 31, 33, 129, 257, 300])):\n"
        "    offs = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(rows).cumsum(0)])\n"
        "    a = torch.randn(int(offs[-1]), K, generator=g)\n"
        "    w = torch.randn(len(rows), 22, K, generator=g) / math.sqrt(K)\n"
        "    for act in ('none', 'silu_mul'):\n"
        "        torch.testing.assert_close(ops.grouped_mm(a, w, offs, activation=None if act == 'none' else act),\n"
        "                                   ref.grouped_mm(a, w, offs, act), atol=1e-5, rtol=1e-4)\n"
        "        for wd in (torch.bfloat16, torch.float16):\n"
        "            w2 = w.to(wd)\n"
        "            torch.testing.assert_close(ops.grouped_mm(a, w2, offs, activation=None if act == 'none' else act),\n"
        "                                       ref.grouped_mm(a, w2.float(), offs, act), atol=1e-5, rtol=1e-4)\n"
        "ids = torch.randint(0, 6, (29, 3), generator=g)\n"
        "plan = ops.moe_plan(ids, 6)\n"
        "y, wts = torch.randn(87, 70, generator=g), torch.rand(29, 3, generator=g)\n"
        "torch.testing.assert_close(ops.combine(y, plan, wts), ref.combine(y, plan.inverse_rows, wts))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, EUREKA_FAST_CPU_ISA=isa)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.parametrize("activation", [None, "silu_mul", "gelu_mul"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "padded"])
def test_grouped_mm_whole_expert_path(activation, layout):
    """Experts with hundreds of rows run as one multi-threaded BLAS call each (gated: blocks of 1024 rows into a
    buffer, then the activation); the row counts straddle both switches (640 rows where the tiles run the AVX-512
    many-rows GEMM, contiguous and padded weights; 384 for BLAS tiles, the transposed weights) and the 1024-row block,
    next to small experts on the tile path. The same result on one thread (tiles only)."""
    gen = torch.Generator().manual_seed(29)
    K, N = 45, 38
    counts = [383, 0, 384, 1030, 5, 700, 639, 640]
    offsets = torch.tensor([0] + counts).cumsum(0)
    a = torch.randn(int(offsets[-1]) + 3, K, generator=gen)  # 3 trailing rows outside every expert
    dense = torch.randn(len(counts), N, K, generator=gen) / math.sqrt(K)
    if layout == "transposed":
        w = dense.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "padded":  # NaN after every weight row: a read past the row would show
        storage = torch.full((len(counts), N, K + 3), float("nan"))
        storage[:, :, :K] = dense
        w = storage[:, :, :K]
    else:
        w = dense
    want = ref.grouped_mm(a, w, offsets, activation or "none")
    previous = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            out = ops.grouped_mm(a, w, offsets, activation=activation)
            torch.testing.assert_close(out, want, **FP32)
            assert bool((out[-3:] == 0).all())
    finally:
        torch.set_num_threads(previous)


def test_whole_expert_switch_rejects_a_bad_setting():
    """EUREKA_FAST_WHOLE_EXPERT_ROWS that is not a positive integer warns and keeps the default (not every expert)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, eureka_fast.ops as ops\n"
        "from eureka_fast.ops import reference as ref\n"
        "torch.set_num_threads(2)\n"
        "a, w, offs = torch.randn(500, 8), torch.randn(2, 6, 8), torch.tensor([0, 3, 500])\n"
        "torch.testing.assert_close(ops.grouped_mm(a, w, offs), ref.grouped_mm(a, w, offs, 'none'))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, EUREKA_FAST_WHOLE_EXPERT_ROWS="abc")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    assert "EUREKA_FAST_WHOLE_EXPERT_ROWS must be a positive integer" in result.stderr


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", [None, "silu_mul"])
@pytest.mark.parametrize("K", [37, 64])
def test_grouped_mm_two_byte_weights_read_in_place(wdtype, activation, K):
    """bf16 / fp16 weights with fp32 inputs are read as stored (widened in registers for few rows, per tile
    otherwise, per expert on the whole-expert path): exactly the fp32 product of the widened weights. Rows per
    expert 0..20 plus 400 (both kernels and the whole-expert switch), K with and without a 16-wide tail, NaN after
    every weight row, and a trailing run of rows outside every expert."""
    gen = torch.Generator().manual_seed(31)
    N = 22
    counts = list(range(21)) + [400]
    E = len(counts)
    offsets = torch.tensor([0] + counts).cumsum(0)
    a = torch.randn(int(offsets[-1]) + 2, K, generator=gen)
    storage = torch.full((E, N, K + 5), float("nan"), dtype=wdtype)
    storage[:, :, :K] = (torch.randn(E, N, K, generator=gen) / math.sqrt(K)).to(wdtype)
    w = storage[:, :, :K]
    want = ref.grouped_mm(a, w.float(), offsets, activation or "none")
    previous = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            out = ops.grouped_mm(a, w, offsets, activation=activation)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, want, **FP32)
            assert bool((out[-2:] == 0).all())
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("activation", [None, "silu_mul", "gelu_mul"])
def test_grouped_mm_bf16_activations_and_weights(activation):
    """bf16 inputs with bf16 weights: tiles past the few-rows kernel and whole experts may run as bf16 matmuls
    (oneDNN) whose results are rounded to bf16, so the tolerance is bf16's; the few-rows rows stay exact-fp32."""
    gen = torch.Generator().manual_seed(41)
    K, N = 72, 40
    counts = [3, 16, 17, 90, 0, 400]
    offsets = torch.tensor([0] + counts).cumsum(0)
    a = torch.randn(int(offsets[-1]), K, generator=gen).to(torch.bfloat16)
    w = (torch.randn(len(counts), N, K, generator=gen) / math.sqrt(K)).to(torch.bfloat16)
    want = ref.grouped_mm(a.float(), w.float(), offsets, activation or "none")
    previous = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            out = ops.grouped_mm(a, w, offsets, activation=activation)
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out.float(), want, **BF16)
            # the few-rows experts are computed in fp32 and rounded once: within one bf16 step of the exact value
            torch.testing.assert_close(out[:19].float(), want[:19], atol=1e-6, rtol=2**-8)
    finally:
        torch.set_num_threads(previous)


def test_bf16_backward_matches_fp32_autograd():
    """All-bf16 training step: grouped_mm's plain backward runs as bf16 matmuls per expert. Gradients against fp32
    autograd of the reference on the same (bf16-exact) values; empty experts get exactly zero weight gradient and
    rows outside every expert exactly zero input gradient. Then the whole fused_experts layer."""
    gen = torch.Generator().manual_seed(43)
    K, N = 48, 36
    counts = [5, 0, 60, 200, 17]
    offsets = torch.tensor([0] + counts).cumsum(0)
    S = int(offsets[-1]) + 4
    a = torch.randn(S, K, generator=gen).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(len(counts), N, K, generator=gen) / math.sqrt(K)).to(torch.bfloat16).requires_grad_()
    upstream = torch.randn(S, N, generator=gen).to(torch.bfloat16)
    ga, gw = torch.autograd.grad((ops.grouped_mm(a, w, offsets).float() * upstream.float()).sum(), (a, w))
    ar, wr = a.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    gar, gwr = torch.autograd.grad((ref.grouped_mm(ar, wr, offsets, "none") * upstream.float()).sum(), (ar, wr))
    assert ga.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    torch.testing.assert_close(ga.float(), gar, **BF16)
    torch.testing.assert_close(gw.float(), gwr, **BF16)
    assert bool((gw[1] == 0).all()) and bool((ga[-4:] == 0).all())

    T, H, I, E, k = 96, 32, 24, 8, 2
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).requires_grad_()
    w_gate_up, w_down = (t.to(torch.bfloat16).requires_grad_() for t in expert_weights(E, H, I, gen=gen))
    ids = make_ids(T, E, k, "skewed", gen)
    weights = torch.rand(T, k, generator=gen).to(torch.bfloat16).requires_grad_()
    up = torch.randn(T, H, generator=gen)
    grads = torch.autograd.grad((ops.fused_experts(x, w_gate_up, w_down, weights, ids).float() * up).sum(),
                                (x, w_gate_up, w_down, weights))
    leaves = [t.detach().float().requires_grad_() for t in (x, w_gate_up, w_down, weights)]
    want = torch.autograd.grad((ref.fused_experts(leaves[0], leaves[1], leaves[2], leaves[3], ids) * up).sum(), leaves)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got.float(), exp, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 5, 300])
def test_fused_experts_two_byte_weights(wdtype, T):
    """The transformers-style bf16/fp16 model: 2-byte weights (one of them a transposed view, which takes the copy
    path) against the fp32 layer on the widened weights."""
    gen = torch.Generator().manual_seed(37)
    H, I, E, k = 40, 24, 16, 4
    x = torch.randn(T, H, generator=gen)
    w_gate_up, w_down = (w.to(wdtype) for w in expert_weights(E, H, I, gen=gen))
    ids = make_ids(T, E, k, "skewed", gen)
    weights = torch.rand(T, k, generator=gen)
    want = ref.fused_experts(x, w_gate_up.float(), w_down.float(), weights, ids)
    torch.testing.assert_close(ops.fused_experts(x, w_gate_up, w_down, weights, ids), want, **FP32)
    w_down_t = w_down.transpose(1, 2).contiguous().transpose(1, 2)  # [E, H, I] view of [E, I, H] storage
    torch.testing.assert_close(ops.fused_experts(x, w_gate_up, w_down_t, weights, ids), want, **FP32)
    out_low = ops.fused_experts(x.to(wdtype), w_gate_up, w_down, weights.to(wdtype), ids)
    assert out_low.dtype == wdtype
    torch.testing.assert_close(out_low.float(), ref.fused_experts(x.to(wdtype).float(), w_gate_up.float(),
                                                                  w_down.float(), weights.to(wdtype).float(), ids),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("activation,fn", [("silu_mul", F.silu), ("gelu_mul", F.gelu)])
def test_gated_activation_epilogue_over_the_float_range(activation, fn):
    """The gated epilogue alone (K = 1, a = 1, up = 1, so the output is act(gate)): from -1e4 to 1e4 including the
    exp clamps at -87/88, signed zeros and tiny values, against torch in float64. 4011 gate values per row, so the
    vector kernels' masked tails run too."""
    vals = torch.cat([torch.linspace(-100, 100, 4001),
                      torch.tensor([0.0, -0.0, 1e-30, -1e-30, 87.5, -87.5, 88.5, -88.5, 1e4, -1e4])])
    n = vals.numel()
    w = torch.cat([vals[:, None], torch.ones(n, 1)])[None]
    out = ops.grouped_mm(torch.ones(3, 1), w, torch.tensor([0, 3]), activation=activation).double()
    want = fn(vals.double()).expand(3, n)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("activation", [None, "silu_mul", "gelu_mul"])
def test_grouped_mm_gradients(activation):
    gen = torch.Generator().manual_seed(17)
    S, K, N, E = 40, 9, 14, 5
    a = torch.randn(S, K, generator=gen, requires_grad=True)
    w = torch.randn(E, N, K, generator=gen, requires_grad=True)
    offsets = torch.tensor([0, 12, 12, 30, 38, 38])
    upstream = torch.randn(S, N if activation is None else N // 2, generator=gen)
    ga, gw = torch.autograd.grad((ops.grouped_mm(a, w, offsets, activation=activation) * upstream).sum(), (a, w))
    ar, wr = a.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    gar, gwr = torch.autograd.grad((ref.grouped_mm(ar, wr, offsets, activation or "none") * upstream).sum(), (ar, wr))
    torch.testing.assert_close(ga, gar, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(gw, gwr, atol=3e-5, rtol=1e-4)
    assert bool((gw[1] == 0).all()) and bool((gw[4] == 0).all())  # zero-row experts: exactly zero
    a64 = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    offs = torch.tensor([0, 2, 2, 6])
    assert torch.autograd.gradcheck(lambda x, y: ops.grouped_mm(x, y, offs, activation=activation), (a64, w64))


# --------------------------------------------------------------------------------------------------------------
# fused_experts
# --------------------------------------------------------------------------------------------------------------
FUSED_CASES = [(E, k) for E in (1, 2, 8, 60, 64) for k in (1, 2, 8, E) if k <= E]


@pytest.mark.parametrize("E,k", sorted(set(FUSED_CASES)))
@pytest.mark.parametrize("T", [0, 1, 7, 33, 256])
@pytest.mark.parametrize("routing", ["uniform", "skewed", "all_to_one"])
def test_fused_experts_case_matrix(E, k, T, routing):
    gen = torch.Generator().manual_seed(E * 31 + k * 7 + T)
    H, I = 21, 10  # not multiples of 8
    x = torch.randn(T, H, generator=gen)
    w_gate_up, w_down = expert_weights(E, H, I, gen=gen)
    ids = make_ids(T, E, k, routing, gen)
    weights = torch.rand(T, k, generator=gen)
    out = ops.fused_experts(x, w_gate_up, w_down, weights, ids)
    assert out.shape == (T, H) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref.fused_experts(x, w_gate_up, w_down, weights, ids), **FP32)
    if T and T * E <= 256 * 8:
        torch.testing.assert_close(out, ref.fused_experts_dense(x, w_gate_up, w_down, weights, ids), **FP32)


@pytest.mark.parametrize("E,k", sorted(set(FUSED_CASES)))
@pytest.mark.parametrize("T", [0, 1, 7, 33, 256])
@pytest.mark.parametrize("routing", ["uniform", "skewed", "all_to_one"])
def test_fused_experts_case_matrix_bf16(E, k, T, routing):
    """The fp32 case matrix's shapes with bf16 activations and weights (fp32 routing weights), against the float64
    dense reference on the same bf16 values at bf16 tolerance (docs/ops.md: inputs of O(0.1..1), atol 2e-2). Takes
    the all-bf16 path where it applies (experts past the few-rows kernel, bf16 matmul hardware), the float path
    otherwise."""
    gen = torch.Generator().manual_seed(E * 31 + k * 7 + T + 1)
    H, I = 21, 10  # not multiples of 8
    x = (torch.randn(T, H, generator=gen) * 0.5).to(torch.bfloat16)
    w_gate_up, w_down = expert_weights(E, H, I, dtype=torch.bfloat16, gen=gen, scale=1.0)
    ids = make_ids(T, E, k, routing, gen)
    weights = torch.rand(T, k, generator=gen)
    weights = weights / weights.sum(1, keepdim=True)
    out = ops.fused_experts(x, w_gate_up, w_down, weights, ids)
    assert out.shape == (T, H) and out.dtype == torch.bfloat16
    if T:
        assert bool(torch.isfinite(out).all())
        want = ref.fused_experts_dense(x.double(), w_gate_up.double(), w_down.double(), weights.double(), ids)
        torch.testing.assert_close(out.double(), want, **BF16)


@pytest.mark.parametrize("T,H,I,E,k", [(4096, 24, 12, 8, 2), (300, 64, 96, 128, 8)])
def test_fused_experts_larger_shapes(T, H, I, E, k):
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(T, H, generator=gen)
    w_gate_up, w_down = expert_weights(E, H, I, gen=gen)
    ids = make_ids(T, E, k, "skewed", gen)
    weights = torch.rand(T, k, generator=gen)
    torch.testing.assert_close(ops.fused_experts(x, w_gate_up, w_down, weights, ids),
                               ref.fused_experts(x, w_gate_up, w_down, weights, ids), **FP32)


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_experts_gather_fused_into_packing(threads):
    """Experts whose gate+up tiles run the AVX-512 many-rows GEMM pack their token rows straight from x (no dense
    gather); the others (few rows; 640+ rows run whole with 2 threads) read the gathered copy. Skewed routing gives
    all three kinds in one call; x rows are strided with NaN between them, H is not a multiple of 16."""
    gen = torch.Generator().manual_seed(43)
    T, H, I, E, k = 900, 40, 24, 12, 2
    x = nan_tailed((T, H), gen, row_pad=7)
    w_gate_up, w_down = expert_weights(E, H, I, gen=gen)
    ids = make_ids(T, E, k, "skewed", gen)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
    assert counts.max() >= 640 and bool(((counts >= 17) & (counts < 640)).any()) and counts.min() < 17
    weights = torch.rand(T, k, generator=gen)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = ops.fused_experts(x, w_gate_up, w_down, weights, ids)
    finally:
        torch.set_num_threads(old)
    want = ref.fused_experts(x.contiguous().double(), w_gate_up.double(), w_down.double(), weights.double(), ids)
    assert not bool(out.isnan().any())
    torch.testing.assert_close(out.double(), want, **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_fused_experts_low_precision(dtype, activation):
    gen = torch.Generator().manual_seed(23)
    T, H, I, E, k = 45, 32, 24, 8, 2
    x = (torch.randn(T, H, generator=gen) * 0.1 * 10).to(dtype)
    w_gate_up, w_down = expert_weights(E, H, I, dtype=dtype, gen=gen, scale=1.0)
    ids = make_ids(T, E, k, "uniform", gen)
    weights = torch.rand(T, k, generator=gen)
    out = ops.fused_experts(x, w_gate_up, w_down, weights, ids, activation=activation)
    assert out.dtype == dtype
    want = ref.fused_experts(x.float(), w_gate_up.float(), w_down.float(), weights, ids, activation)
    torch.testing.assert_close(out.float(), want, **BF16)


def test_fused_experts_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(29)
    T, H, I, E, k = 50, 16, 12, 8, 2
    x = torch.randn(H, T, generator=gen).t()  # column-major x
    w_gate_up, w_down = expert_weights(E, H, I, gen=gen)
    wgu_t = w_gate_up.transpose(1, 2).contiguous().transpose(1, 2)  # [E, H, 2I] storage
    wd_t = w_down.transpose(1, 2).contiguous().transpose(1, 2)
    ids = make_ids(T, E, k, "uniform", gen)
    weights = torch.rand(k, T, generator=gen).t()
    want = ref.fused_experts(x.contiguous(), w_gate_up, w_down, weights.contiguous(), ids)
    torch.testing.assert_close(ops.fused_experts(x, wgu_t, wd_t, weights, ids.t().contiguous().t()), want, **FP32)


def test_fused_experts_gradients_and_gradcheck():
    gen = torch.Generator().manual_seed(31)
    T, H, I, E, k = 26, 11, 7, 5, 2
    x = torch.randn(T, H, generator=gen, requires_grad=True)
    wgu, wd = (t.requires_grad_() for t in expert_weights(E, H, I, gen=gen, scale=1.0))
    ids = make_ids(T, E, k, "skewed", gen)
    weights = torch.rand(T, k, generator=gen, requires_grad=True)
    upstream = torch.randn(T, H, generator=gen)
    for activation in ("silu", "gelu"):
        inputs = (x, wgu, wd, weights)
        grads = torch.autograd.grad((ops.fused_experts(x, wgu, wd, weights, ids, activation=activation) * upstream).sum(), inputs)
        clones = [t.detach().clone().requires_grad_() for t in inputs]
        want = torch.autograd.grad((ref.fused_experts(*clones[:3], clones[3], ids, activation) * upstream).sum(), clones)
        for g, r in zip(grads, want):
            torch.testing.assert_close(g, r, atol=3e-5, rtol=1e-4)
    d = dict(dtype=torch.float64)
    x64 = torch.randn(4, 3, **d, requires_grad=True)
    wgu64 = torch.randn(3, 4, 3, **d, requires_grad=True)
    wd64 = torch.randn(3, 3, 2, **d, requires_grad=True)
    w64 = torch.rand(4, 2, **d, requires_grad=True)
    ids64 = torch.tensor([[0, 2], [2, 1], [0, 1], [2, 0]], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda a, b, c, e: ops.fused_experts(a, b, c, e, ids64), (x64, wgu64, wd64, w64))


def _bitwise_equal(first, second):
    """Same dtype, shape and bytes (tensors, or tuples of them)."""
    if isinstance(first, torch.Tensor):
        as_bytes = lambda t: t.contiguous().view(-1).view(torch.uint8)  # noqa: E731
        return first.dtype == second.dtype and first.shape == second.shape and torch.equal(as_bytes(first),
                                                                                           as_bytes(second))
    return len(first) == len(second) and all(_bitwise_equal(a, b) for a, b in zip(first, second))


def test_two_runs_bitwise_equal():
    """Every op, run twice on the same inputs (threaded: the default thread count), gives the same bits (compared
    as bytes, so NaN payloads and signed zeros count too): route_topk (softmax and grouped sigmoid), moe_plan,
    permute, combine, grouped_mm forward (skewed rows: few-rows, many-rows and whole-expert tiles), fused_experts in
    fp32 and bf16, moe_aux_loss."""
    gen = torch.Generator().manual_seed(37)
    T, H, I, E, k = 300, 48, 40, 16, 4
    x = torch.randn(T, H, generator=gen)
    wgu, wd = expert_weights(E, H, I, gen=gen)
    logits = torch.randn(T, E, generator=gen)
    ids = make_ids(T, E, k, "skewed", gen)
    weights = torch.rand(T, k, generator=gen)
    plan = ops.moe_plan(ids, E)
    y = torch.randn(T * k, H, generator=gen)
    offsets = torch.tensor([0, 3, 3, 40, 500, 900, 1200])
    a = torch.randn(1200, 36, generator=gen)
    w = torch.randn(6, 50, 36, generator=gen) / 6
    x16, wgu16, wd16 = x.to(torch.bfloat16), wgu.to(torch.bfloat16), wd.to(torch.bfloat16)
    runs = {
        "route_topk softmax": lambda: ops.route_topk(logits, k, renormalize=True),
        "route_topk grouped sigmoid": lambda: ops.route_topk(logits, k, scoring="sigmoid", correction_bias=logits[0],
                                                             n_group=4, topk_group=2, routed_scaling=2.5),
        "moe_plan": lambda: ops.moe_plan(ids, E, block=8)[:5],
        "permute": lambda: ops.permute(x, plan),
        "combine": lambda: ops.combine(y, plan, weights),
        "grouped_mm": lambda: ops.grouped_mm(a, w, offsets),
        "grouped_mm silu_mul": lambda: ops.grouped_mm(a, w, offsets, activation="silu_mul"),
        "grouped_mm bf16": lambda: ops.grouped_mm(a.to(torch.bfloat16), w.to(torch.bfloat16), offsets),
        "fused_experts": lambda: ops.fused_experts(x, wgu, wd, weights, ids),
        "fused_experts bf16": lambda: ops.fused_experts(x16, wgu16, wd16, weights, ids),
        "moe_aux_loss": lambda: ops.moe_aux_loss(torch.softmax(logits, -1), ids),
    }
    for name, run in runs.items():
        assert _bitwise_equal(run(), run()), name


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_experts_matches_transformers_experts(family):
    """Same weights, same outputs as the real transformers 5 expert modules (tiny random configs, no downloads)."""
    torch.manual_seed(41)
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

        config = Qwen3MoeConfig(hidden_size=40, moe_intermediate_size=24, num_experts=12, num_experts_per_tok=4,
                                norm_topk_prob=True, hidden_act="silu")
        E, k, renorm = 12, 4, True
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        config = MixtralConfig(hidden_size=40, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                               hidden_act="silu")
        E, k, renorm = 8, 2, True
    block = Block(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    hidden = torch.randn(3, 11, 40)
    with torch.no_grad():
        want = block(hidden)
        if isinstance(want, tuple):
            want = want[0]
        flat = hidden.view(-1, 40)
        logits = F.linear(flat, block.gate.weight)
        weights, ids = ops.route_topk(logits, k, renormalize=renorm)
        out = ops.fused_experts(flat, block.experts.gate_up_proj, block.experts.down_proj, weights, ids)
    torch.testing.assert_close(out.view_as(want), want, **FP32)


# --------------------------------------------------------------------------------------------------------------
# moe_aux_loss
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,E,k,routing", [(0, 4, 2, "skewed"), (1, 1, 1, "skewed"), (37, 8, 2, "skewed"),
                                            (256, 64, 8, "skewed"), (33, 60, 60, "uniform"), (7, 2, 2, "uniform"),
                                            (50, 8, 2, "all_to_one"), (129, 128, 8, "uniform")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_moe_aux_loss(T, E, k, routing, dtype):
    """k = E, E = 1, all-to-one routing (the loss's maximum, E * P_0...), bf16 and float64 probabilities; the loss is
    float32 (float64 for float64 probabilities), its gradient in the probabilities' dtype."""
    gen = torch.Generator().manual_seed(43 + T + E)
    probs = torch.softmax(torch.randn(T, E, generator=gen), -1).to(dtype).requires_grad_()
    ids = make_ids(T, E, k, routing, gen)
    loss = ops.moe_aux_loss(probs, ids)
    want = ref.moe_aux_loss(probs, ids)
    assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss, want, **FP32)
    if T:
        # independent formula in float64: E * sum_e mean_t p[t,e] * count_e / (T*k)
        counts = torch.bincount(ids.flatten().long(), minlength=E).double()
        independent = E * (probs.detach().double().mean(0) * counts / (T * k)).sum()
        torch.testing.assert_close(loss.double(), independent, **FP32)
        (g,) = torch.autograd.grad(loss, probs)
        (gr,) = torch.autograd.grad(want, probs)
        assert g.dtype == dtype
        torch.testing.assert_close(g, gr, **FP32)
    else:
        assert float(loss.detach()) == 0.0


def test_moe_aux_loss_non_contiguous_probs():
    gen = torch.Generator().manual_seed(47)
    T, E, k = 40, 12, 3
    probs = torch.softmax(torch.randn(E, T, generator=gen), 0).t()  # column-major
    ids = make_ids(T, E, k, "uniform", gen)
    torch.testing.assert_close(ops.moe_aux_loss(probs, ids), ref.moe_aux_loss(probs.contiguous(), ids), **FP32)
    torch.testing.assert_close(ops.moe_aux_loss(probs, ids.t().contiguous().t()),
                               ref.moe_aux_loss(probs.contiguous(), ids), **FP32)
