"""CUDA kernels of torch.ops.eureka_fast against the pure-PyTorch references (eureka_fast.ops.reference).

Skipped unless a CUDA device is present and the extension was built with its CUDA kernels. The ops are called
through torch.ops.eureka_fast directly so that these tests cover the CUDA kernels themselves; every grouped-GEMM
case runs on each kernel path (EUREKA_FAST_GEMM=stream|tiled|wgmma|simt, and the automatic choice).
Integer outputs must match exactly; float outputs are compared by ||out - ref|| / ||ref||.
"""
from __future__ import annotations

import os

import pytest
import torch

from eureka_fast.ops import reference as ref

try:  # loads the extension (registers torch.ops.eureka_fast.*)
    from eureka_fast import _C  # noqa: F401
except ImportError:  # pragma: no cover
    _C = None


def _has_cuda_kernels() -> bool:
    if _C is None or not torch.cuda.is_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("eureka_fast::fused_experts", "CUDA")
    except RuntimeError:
        return False


if not _has_cuda_kernels():  # skip at module level: no 1600-case collection on machines without a GPU
    pytest.skip("needs a CUDA device and eureka_fast built with CUDA kernels", allow_module_level=True)

pytestmark = [pytest.mark.cuda]


@pytest.fixture(autouse=True)
def _every_cuda_kernel_path():
    """These tests are of the kernels themselves: every GEMM regime may run, whatever the validation policy."""
    from eureka_fast.ops import cuda_policy

    cuda_policy.configure("all")
    yield
    cuda_policy.configure()

ops = torch.ops.eureka_fast
DEV = "cuda"
PATHS = ["auto", "stream", "tiled", "wgmma", "simt"]  # wgmma falls back to auto where it does not apply


@pytest.fixture
def gemm_path(request, monkeypatch):
    path = request.param
    if path == "auto":
        monkeypatch.delenv("EUREKA_FAST_GEMM", raising=False)
    else:
        monkeypatch.setenv("EUREKA_FAST_GEMM", path)
    return path


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.double().cpu(), want.double().cpu()
    assert out.shape == want.shape, (out.shape, want.shape)
    assert torch.isfinite(out).all(), "non-finite values in the output (unwritten elements?)"
    den = want.norm().item()
    return (out - want).norm().item() / (den if den > 0 else 1.0)


def tol(dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 4e-3}[dtype]


def make_ids(T, E, k, mode, gen):
    """[T, k] int32 expert ids, distinct within a row."""
    if T == 0:
        return torch.zeros(0, k, dtype=torch.int32)
    if mode == "uniform":
        return torch.argsort(torch.rand(T, E, generator=gen), dim=1)[:, :k].int()
    if mode == "skewed":  # most rows on the first few experts
        p = torch.exp(-torch.arange(E, dtype=torch.float64) / max(1.0, E / 8)).expand(T, E)
        return torch.multinomial(p, k, replacement=False, generator=gen).int()
    if mode == "all_to_one":  # slot 0 is always expert E-1: one expert takes every token
        ids = make_ids(T, E, k, "uniform", gen).long()
        has = ids == E - 1
        pos = torch.where(has.any(1), has.float().argmax(1), torch.zeros(T, dtype=torch.long))
        rows = torch.arange(T)
        first = ids[:, 0].clone()
        ids[rows, pos] = first  # swap E-1 (if present) into slot 0
        ids[:, 0] = E - 1
        return ids.int()
    raise ValueError(mode)


# ---------------------------------------------------------------------------------------------------------------
# route_topk
# ---------------------------------------------------------------------------------------------------------------
ROUTE_CASES = [(T, E, k) for T in (0, 1, 7, 33, 256, 4096) for E in (1, 2, 8, 60, 64, 128) for k in (1, 2, 8, E)
               if k <= E]


@pytest.mark.parametrize("T,E,k", ROUTE_CASES)
@pytest.mark.parametrize("scoring,renorm", [("softmax", False), ("softmax", True), ("sigmoid", True)])
def test_route_topk(T, E, k, scoring, renorm):
    gen = torch.Generator().manual_seed(T * 1000 + E * 10 + k)
    logits = torch.randn(T, E, generator=gen)
    w, i = ops.route_topk(logits.to(DEV), k, scoring, renorm, None, 1, 1, 1.0)
    wr, ir = ref.route_topk(logits, k, scoring, renorm)
    assert i.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(i.cpu(), ir)
    torch.testing.assert_close(w.cpu(), wr, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("E,k,n_group,topk_group", [(64, 8, 8, 4), (256, 8, 8, 4), (16, 16, 4, 4), (32, 4, 1, 1)])
def test_route_topk_grouped_bias(dtype, E, k, n_group, topk_group):
    gen = torch.Generator().manual_seed(E + k)
    T = 97
    logits = torch.randn(T, E, generator=gen).to(dtype)
    bias = torch.randn(E, generator=gen) * 0.1
    w, i = ops.route_topk(logits.to(DEV), k, "sigmoid", True, bias.to(DEV), n_group, topk_group, 2.5)
    wr, ir = ref.route_topk(logits, k, "sigmoid", True, bias, n_group, topk_group, 2.5)
    assert torch.equal(i.cpu(), ir)
    torch.testing.assert_close(w.cpu(), wr, atol=1e-5, rtol=1e-4)


def test_route_topk_ties_go_to_lower_id():
    logits = torch.zeros(5, 16)
    logits[:, 3] = 1.0
    w, i = ops.route_topk(logits.to(DEV), 4, "softmax", False, None, 1, 1, 1.0)
    assert i.cpu().tolist() == [[3, 0, 1, 2]] * 5


# ---------------------------------------------------------------------------------------------------------------
# moe_plan / permute / combine
# ---------------------------------------------------------------------------------------------------------------
PLAN_CASES = [(T, E, k) for T in (0, 1, 7, 33, 256, 4096) for E in (1, 2, 8, 60, 128) for k in (1, 2, 8, E)
              if k <= E and T * k <= 300000] + [(40000, 128, 8), (20000, 8, 4), (70000, 60, 2)]


@pytest.mark.parametrize("T,E,k", PLAN_CASES)
@pytest.mark.parametrize("mode", ["uniform", "skewed", "all_to_one"])
def test_moe_plan(T, E, k, mode):
    gen = torch.Generator().manual_seed(T + 7 * E + k)
    ids = make_ids(T, E, k, mode, gen)
    for block in (0, 16, 128):
        got = ops.moe_plan(ids.to(DEV), E, block)
        want = ref.moe_plan(ids, E, block)
        for g, w_, name in zip(got, want, ["counts", "offsets", "padded_offsets", "sorted_rows", "inverse_rows"]):
            assert g.dtype == torch.int64, name
            assert torch.equal(g.cpu(), w_), f"{name} differs (T={T} E={E} k={k} {mode} block={block})"


def test_moe_plan_int64_ids_and_invariants():
    gen = torch.Generator().manual_seed(3)
    ids = make_ids(1000, 64, 6, "skewed", gen).long()
    counts, offsets, padded, srt, inv = ops.moe_plan(ids.to(DEV), 64, 32)
    assert counts.sum().item() == ids.numel()
    assert torch.equal(srt[inv].cpu(), torch.arange(ids.numel()))
    assert (padded.cpu() % 32 == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("H", [1, 7, 64, 100, 2048])
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (33, 8, 4), (257, 64, 8), (16, 4, 4)])
def test_permute_combine(dtype, H, T, E, k):
    gen = torch.Generator().manual_seed(H + T)
    ids = make_ids(T, E, k, "uniform", gen)
    x = torch.randn(T, 2 * H, generator=gen).to(dtype)[:, ::2]  # non-contiguous rows
    w = torch.rand(T, k, generator=gen)
    _, _, _, srt, inv = ref.moe_plan(ids, E)
    xs = ops.permute(x.to(DEV), srt.to(DEV), k)
    assert torch.equal(xs.cpu(), ref.permute(x, srt, k))
    y = torch.randn(T * k, H, generator=gen).to(dtype)
    out = ops.combine(y.to(DEV), inv.to(DEV), w.to(DEV))
    assert rel_err(out, ref.combine(y, inv, w)) < max(tol(dtype), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("H,pad", [(64, 0), (33, 5), (1024, 3)])
def test_combine_backward(dtype, H, pad):
    gen = torch.Generator().manual_seed(H)
    T, E, k = 40, 8, 3
    ids = make_ids(T, E, k, "skewed", gen)
    _, _, _, _, inv = ref.moe_plan(ids, E)
    y = torch.randn(T * k + pad, H, generator=gen, dtype=torch.float64)
    w = torch.rand(T, k, generator=gen, dtype=torch.float64)
    g = torch.randn(T, H, generator=gen, dtype=torch.float64)
    yr, wr = y.clone().requires_grad_(), w.clone().requires_grad_()
    ref.combine(yr, inv, wr).backward(g)
    gy, gw = ops.combine_backward(g.to(dtype).to(DEV), y.to(dtype).to(DEV), inv.to(DEV),
                                  w.to(torch.float64 if dtype == torch.float64 else torch.float32).to(DEV))
    assert gy.shape == y.shape
    assert (gy[T * k:] == 0).all()
    assert rel_err(gy, yr.grad) < max(tol(dtype), 1e-6)
    assert rel_err(gw, wr.grad) < max(tol(dtype), 1e-6)


# ---------------------------------------------------------------------------------------------------------------
# grouped_mm (every kernel path) and its backward
# ---------------------------------------------------------------------------------------------------------------
def make_offsets(counts):
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)])


GMM_SHAPES = [
    # (counts per expert, K, N, tail rows)
    ([3, 0, 5, 1], 64, 96, 0),          # zero-token expert
    ([0, 0, 40, 0], 128, 256, 2),       # one expert takes every row; tail rows must be zero
    ([1] * 8, 256, 512, 0),             # decode-like: one row per expert
    ([70, 130, 1, 200], 72, 136, 0),    # K, N multiples of 8 but not of 16/32, partial tiles
    ([5, 9], 20, 30, 3),                # K not a multiple of 8 -> SIMT fallback
    ([129, 0, 257], 512, 256, 0),       # several M tiles per expert
    ([0, 0, 0], 64, 64, 4),             # no rows at all
]


@pytest.mark.parametrize("gemm_path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activation", ["none", "silu_mul", "gelu_mul"])
@pytest.mark.parametrize("shape", GMM_SHAPES)
@pytest.mark.parametrize("w_layout", ["contiguous", "transposed"])
def test_grouped_mm(gemm_path, dtype, activation, shape, w_layout):
    counts, K, N, tail = shape
    gen = torch.Generator().manual_seed(K * N + len(counts))
    E = len(counts)
    offsets = make_offsets(counts)
    S = int(offsets[-1]) + tail
    a = (torch.randn(S, K, generator=gen) * 0.5).to(dtype)
    w = (torch.randn(E, N, K, generator=gen) / K ** 0.5).to(dtype)
    wd = w.to(DEV)
    if w_layout == "transposed":  # [E, N, K] view of a [E, K, N] tensor (stride(1) == 1)
        wd = w.transpose(1, 2).contiguous().to(DEV).transpose(1, 2)
    out = ops.grouped_mm(a.to(DEV), wd, offsets.to(DEV), activation)
    want = ref.grouped_mm(a.double(), w.double(), offsets, activation)
    assert out.dtype == dtype
    assert rel_err(out, want) < tol(dtype)
    if tail:
        assert (out[int(offsets[-1]):] == 0).all()


@pytest.mark.parametrize("gemm_path", ["auto", "simt"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["none", "silu_mul", "gelu_mul"])
@pytest.mark.parametrize("shape", [([3, 0, 5, 1], 64, 96, 0), ([70, 130, 1, 200], 72, 136, 2), ([5, 9], 20, 30, 0)])
def test_grouped_mm_backward(gemm_path, dtype, activation, shape):
    counts, K, N, tail = shape
    gen = torch.Generator().manual_seed(K + N)
    E = len(counts)
    offsets = make_offsets(counts)
    S = int(offsets[-1]) + tail
    a = (torch.randn(S, K, generator=gen) * 0.5).double().requires_grad_()
    w = (torch.randn(E, N, K, generator=gen) / K ** 0.5).double().requires_grad_()
    n_out = N if activation == "none" else N // 2
    g = torch.randn(S, n_out, generator=gen, dtype=torch.float64)
    ref.grouped_mm(a, w, offsets, activation).backward(g)
    ga, gw = ops.grouped_mm_backward(g.to(dtype).to(DEV), a.detach().to(dtype).to(DEV), w.detach().to(dtype).to(DEV),
                                     offsets.to(DEV), activation)
    t = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    assert rel_err(ga, a.grad) < t
    assert rel_err(gw, w.grad) < t
    for e, c in enumerate(counts):
        if c == 0:
            assert (gw[e] == 0).all(), "experts without rows must get a zero weight gradient"


# ---------------------------------------------------------------------------------------------------------------
# fused_experts
# ---------------------------------------------------------------------------------------------------------------
FUSED_CASES = [
    # (T, H, I, E, k)
    (0, 64, 32, 4, 2),
    (1, 256, 128, 16, 4),
    (7, 128, 96, 8, 4),        # Eureka-like ratios
    (33, 256, 64, 64, 8),      # Qwen-like ratios
    (256, 128, 64, 8, 8),      # k == E
    (300, 72, 40, 8, 2),       # H, I multiples of 8 only
    (50, 100, 30, 4, 2),       # not multiples of 8 -> SIMT path
    (1024, 256, 128, 2, 1),
]


@pytest.mark.parametrize("gemm_path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("mode", ["uniform", "all_to_one"])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_fused_experts(gemm_path, dtype, case, mode, activation):
    T, H, I, E, k = case
    gen = torch.Generator().manual_seed(T + H + I + E + k)
    x = (torch.randn(T, H, generator=gen) * 0.5).to(dtype)
    w1 = (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(dtype)
    ids = make_ids(T, E, k, mode, gen)
    wts = torch.rand(T, k, generator=gen)
    out = ops.fused_experts(x.to(DEV), w1.to(DEV), w2.to(DEV), wts.to(DEV), ids.to(DEV), activation)
    want = ref.fused_experts(x.double(), w1.double(), w2.double(), wts.double(), ids, activation)
    assert out.shape == (T, H) and out.dtype == dtype
    assert rel_err(out, want) < tol(dtype) * (1.5 if dtype != torch.float32 else 1)
    if T and dtype == torch.float32:
        dense = ref.fused_experts_dense(x, w1, w2, wts, ids, activation)
        assert rel_err(out, dense) < 1e-4


def test_fused_experts_deterministic():
    gen = torch.Generator().manual_seed(0)
    T, H, I, E, k = 2000, 256, 128, 16, 4
    x = torch.randn(T, H, generator=gen).bfloat16().to(DEV)
    w1 = (torch.randn(E, 2 * I, H, generator=gen) / 16).bfloat16().to(DEV)
    w2 = (torch.randn(E, H, I, generator=gen) / 11).bfloat16().to(DEV)
    ids = make_ids(T, E, k, "skewed", gen).to(DEV)
    wts = torch.rand(T, k, generator=gen).to(DEV)
    a = ops.fused_experts(x, w1, w2, wts, ids, "silu")
    b = ops.fused_experts(x, w1, w2, wts, ids, "silu")
    assert torch.equal(a, b)


def test_cuda_graph_capture_matches_eager():
    gen = torch.Generator().manual_seed(1)
    T, H, I, E, k = 64, 256, 128, 32, 4
    x = torch.randn(T, H, generator=gen).bfloat16().to(DEV)
    logits = torch.randn(T, E, generator=gen).to(DEV)
    w1 = (torch.randn(E, 2 * I, H, generator=gen) / 16).bfloat16().to(DEV)
    w2 = (torch.randn(E, H, I, generator=gen) / 11).bfloat16().to(DEV)

    def layer():
        wts, ids = ops.route_topk(logits, k, "softmax", True, None, 1, 1, 1.0)
        return ops.fused_experts(x, w1, w2, wts, ids, "silu")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            layer()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = layer()
    for _ in range(3):
        x.copy_(torch.randn(T, H, generator=gen).bfloat16())
        logits.copy_(torch.randn(T, E, generator=gen))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, layer())


# ---------------------------------------------------------------------------------------------------------------
# moe_aux_loss, stack_norm_project
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,E,k", [(0, 8, 2), (1, 8, 2), (300, 64, 8)])
def test_moe_aux_loss(T, E, k):
    gen = torch.Generator().manual_seed(T)
    probs = torch.softmax(torch.randn(T, E, generator=gen), -1)
    ids = make_ids(T, E, k, "skewed", gen)
    got = ops.moe_aux_loss(probs.to(DEV), ids.to(DEV))
    torch.testing.assert_close(got.cpu(), ref.moe_aux_loss(probs, ids), atol=1e-6, rtol=1e-5)


SNP_CASES = [
    dict(k=4, norm="layer", activation="silu", pool="stack", w2=True),    # Eureka default
    dict(k=4, norm="none", activation="gelu", pool="stack", w2=True),     # Voxtral-like
    dict(k=8, norm="rms", activation="swiglu", pool="stack", w2=True),    # Ultravox-like
    dict(k=2, norm="none", activation="none", pool="mean", w2=False),     # Qwen2-Audio-like
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", SNP_CASES)
@pytest.mark.parametrize("T", [1, 30, 37])
@pytest.mark.parametrize("use_lengths", [False, True])
def test_stack_norm_project(dtype, case, T, use_lengths):
    gen = torch.Generator().manual_seed(T)
    B, D, d = 3, 48, 64
    k = case["k"]
    C = D if case["pool"] == "mean" else k * D
    x = torch.randn(B, T, D, generator=gen).to(dtype)
    lengths = torch.tensor([T, max(1, T - 5), max(1, T // 2)]) if use_lengths else None
    nw = torch.rand(C, generator=gen) + 0.5 if case["norm"] != "none" else None
    nb = torch.randn(C, generator=gen) * 0.1 if case["norm"] == "layer" else None
    d1 = 2 * d if case["activation"] == "swiglu" else d
    w1 = (torch.randn(d1, C, generator=gen) / C ** 0.5).to(dtype)
    b1 = (torch.randn(d1, generator=gen) * 0.1).to(dtype)
    w2 = (torch.randn(d, d, generator=gen) / d ** 0.5).to(dtype) if case["w2"] else None
    b2 = (torch.randn(d, generator=gen) * 0.1).to(dtype) if case["w2"] else None
    cu = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    out = ops.stack_norm_project(x.to(DEV), k, cu(lengths), case["norm"], cu(nw), cu(nb), cu(w1), cu(b1),
                                 case["activation"], cu(w2), cu(b2), 1e-5, case["pool"])
    want = ref.stack_norm_project(x.double(), k, lengths, None if case["norm"] == "none" else case["norm"],
                                  None if nw is None else nw.double(), None if nb is None else nb.double(),
                                  w1.double(), b1.double(), None if case["activation"] == "none" else case["activation"],
                                  None if w2 is None else w2.double(), None if b2 is None else b2.double(), 1e-5,
                                  case["pool"])
    assert out.shape == want.shape and out.dtype == dtype
    assert rel_err(out, want) < (2e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.skipif(os.environ.get("EUREKA_FAST_BIG") != "1", reason="index-overflow case needs ~12 GB; EUREKA_FAST_BIG=1")
def test_index_overflow_fused_experts():
    """T*k*H > 2^31: every row * stride product must be 64-bit."""
    T, H, I, E, k = 140_000, 2048, 64, 8, 8
    assert T * k * H > 2 ** 31
    gen = torch.Generator(device=DEV).manual_seed(0)
    x = (torch.randn(T, H, device=DEV, generator=gen) * 0.5).bfloat16()
    w1 = (torch.randn(E, 2 * I, H, device=DEV, generator=gen) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device=DEV, generator=gen) / I ** 0.5).bfloat16()
    ids = torch.argsort(torch.rand(T, E, device=DEV, generator=gen), dim=1)[:, :k].int()
    wts = torch.rand(T, k, device=DEV, generator=gen)
    out = ops.fused_experts(x, w1, w2, wts, ids, "silu")
    sel = torch.cat([torch.arange(0, 64), torch.arange(T - 64, T)]).to(DEV)
    want = ref.fused_experts(x[sel].double(), w1.double(), w2.double(), wts[sel].double(), ids[sel], "silu")
    assert rel_err(out[sel], want) < 2e-2
