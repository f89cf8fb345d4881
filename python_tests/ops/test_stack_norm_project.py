"""stack_norm_project against the reference, an eager chain written here, conv1d, and the published presets."""
import math

import pytest
import torch
import torch.nn.functional as F

import eureka_fast.ops as ops
from eureka_fast.ops import reference as ref
from eureka_fast.ops.api import DOWNSAMPLE_PRESETS, downsample_preset

pytestmark = [
    pytest.mark.skipif(ops.backend() != "compiled", reason="eureka_fast._C is not built"),
    pytest.mark.usefixtures("poisoned_empty_tensors"),
]

FP32 = dict(atol=2e-5, rtol=1e-4)


def eager_chain(x, k, norm, nw, nb, w1, b1, activation, w2, b2, eps=1e-5):
    """The plain module chain an adapter would write (full-length clips): pad, reshape, norm, Linear, act, Linear."""
    B, T, D = x.shape
    T_out = math.ceil(T / k)
    h = F.pad(x, (0, 0, 0, T_out * k - T)).reshape(B, T_out, k * D)
    if norm == "layer":
        h = F.layer_norm(h, (k * D,), nw, nb, eps)
    elif norm == "rms":
        h = F.rms_norm(h, (k * D,), nw, eps)
    h = F.linear(h, w1, b1)
    if activation == "silu":
        h = F.silu(h)
    elif activation == "gelu":
        h = F.gelu(h)
    elif activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    if w2 is not None:
        h = F.linear(h, w2, b2)
    return h


def params(width, hidden, out, gen, *, norm="layer", activation="silu", mlp=False):
    nw = torch.randn(width, generator=gen) * 0.2 + 1 if norm in ("layer", "rms") else None
    nb = torch.randn(width, generator=gen) * 0.1 if norm == "layer" else None
    n1 = 2 * hidden if activation == "swiglu" else hidden
    w1 = torch.randn(n1, width, generator=gen) / math.sqrt(width)
    b1 = torch.randn(n1, generator=gen) * 0.1
    w2 = torch.randn(out, hidden, generator=gen) / math.sqrt(hidden) if mlp else None
    b2 = torch.randn(out, generator=gen) * 0.1 if mlp else None
    return dict(norm=norm, norm_weight=nw, norm_bias=nb, w1=w1, b1=b1, activation=activation, w2=w2, b2=b2)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("T", [1, 7, 16, 33])
@pytest.mark.parametrize("norm,activation,mlp", [("layer", "silu", False), (None, "gelu", True), ("rms", "swiglu", True),
                                                 (None, None, False)])
def test_matches_eager_chain_and_reference(k, T, norm, activation, mlp):
    gen = torch.Generator().manual_seed(k * 100 + T)
    B, D = 3, 10
    x = torch.randn(B, T, D, generator=gen)
    p = params(k * D, 12, 9, gen, norm=norm, activation=activation, mlp=mlp)
    out = ops.stack_norm_project(x, k, **p)
    assert out.shape[:2] == (B, math.ceil(T / k))
    torch.testing.assert_close(out, ref.stack_norm_project(x, k, None, norm, p["norm_weight"], p["norm_bias"], p["w1"],
                                                           p["b1"], activation, p["w2"], p["b2"]), **FP32)
    # with T % k != 0 the eager chain zero-pads the tail frames before the norm, which is our semantics too
    torch.testing.assert_close(out, eager_chain(x, k, norm, p["norm_weight"], p["norm_bias"], p["w1"], p["b1"],
                                                activation, p["w2"], p["b2"]), **FP32)


@pytest.mark.parametrize("k,T", [(4, 16), (4, 10), (3, 7), (8, 8)])
def test_stack_linear_equals_conv1d(k, T):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, T, 6, generator=gen)
    w1 = torch.randn(5, k * 6, generator=gen)
    b1 = torch.randn(5, generator=gen)
    out = ops.stack_norm_project(x, k, norm=None, w1=w1, b1=b1, activation=None)
    torch.testing.assert_close(out, ref.conv1d_downsample(x, k, w1, b1), **FP32)


@pytest.mark.parametrize("pool", ["stack", "mean"])
@pytest.mark.parametrize("norm,activation,mlp", [("layer", "silu", False), ("rms", "swiglu", True), (None, None, False)])
def test_ragged_lengths(pool, norm, activation, mlp):
    gen = torch.Generator().manual_seed(9)
    B, T, D, k = 4, 19, 8, 4
    x = torch.randn(B, T, D, generator=gen)
    lengths = torch.tensor([19, 5, 0, 12])
    width = D if pool == "mean" else k * D
    p = params(width, 10, 6, gen, norm=norm, activation=activation, mlp=mlp)
    out = ops.stack_norm_project(x, k, lengths=lengths, pool=pool, **p)
    want = ref.stack_norm_project(x, k, lengths, norm, p["norm_weight"], p["norm_bias"], p["w1"], p["b1"], activation,
                                  p["w2"], p["b2"], 1e-5, pool)
    torch.testing.assert_close(out, want, **FP32)
    # each clip alone, cut to its own length, gives the same valid rows; rows past ceil(len / k) are zero
    for b, n in enumerate(lengths.tolist()):
        rows = math.ceil(n / k)
        assert bool((out[b, rows:] == 0).all())
        if n:
            alone = ops.stack_norm_project(x[b:b + 1, :n], k, pool=pool, **p)
            torch.testing.assert_close(out[b, :rows], alone[0], **FP32)


def test_mean_pool_matches_avg_pool():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 30, 16, generator=gen)
    out = ops.stack_norm_project(x, 2, pool="mean", norm=None, activation=None)
    torch.testing.assert_close(out, F.avg_pool1d(x.transpose(1, 2), 2, 2).transpose(1, 2), **FP32)


@pytest.mark.parametrize("name", sorted(DOWNSAMPLE_PRESETS))
def test_presets(name):
    gen = torch.Generator().manual_seed(12)
    preset = downsample_preset(name, 16, 24, generator=gen)
    x = torch.randn(2, 21, 16, generator=gen)
    out = ops.stack_norm_project(x, **preset)
    k = DOWNSAMPLE_PRESETS[name]["k"]
    assert out.shape == (2, math.ceil(21 / k), 16 if name == "qwen2-audio" else 24)
    torch.testing.assert_close(out, ops.stack_norm_project(x, **preset, use_reference=True), **FP32)


@pytest.mark.parametrize("pool,norm,activation,mlp", [("stack", "layer", "silu", False), ("stack", "rms", "swiglu", True),
                                                      ("mean", "layer", "gelu", True), ("stack", None, "gelu", False)])
def test_gradients(pool, norm, activation, mlp):
    gen = torch.Generator().manual_seed(14)
    B, T, D, k = 3, 11, 6, 4
    lengths = torch.tensor([11, 6, 3])
    x = torch.randn(B, T, D, generator=gen)
    width = D if pool == "mean" else k * D
    p = params(width, 8, 5, gen, norm=norm, activation=activation, mlp=mlp)
    names = [n for n in ("norm_weight", "norm_bias", "w1", "b1", "w2", "b2") if p[n] is not None]
    leaves = [x.clone().requires_grad_()] + [p[n].clone().requires_grad_() for n in names]

    def run(use_reference, tensors):
        kw = dict(p, **dict(zip(names, tensors[1:])))
        return ops.stack_norm_project(tensors[0], k, lengths=lengths, pool=pool, use_reference=use_reference, **kw)

    upstream = torch.randn_like(run(True, leaves))
    got = torch.autograd.grad((run(False, leaves) * upstream).sum(), leaves)
    want = torch.autograd.grad((run(True, leaves) * upstream).sum(), leaves)
    for name, g, r in zip(["x"] + names, got, want):
        torch.testing.assert_close(g, r, atol=3e-5, rtol=1e-4, msg=name)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    assert torch.autograd.gradcheck(lambda *ts: run(False, list(ts)), leaves64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_fp32_reference(dtype):
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(2, 13, 8, generator=gen)
    p = params(32, 12, 6, gen, norm="layer", activation="gelu", mlp=True)
    low = {n: (t.to(dtype) if isinstance(t, torch.Tensor) else t) for n, t in p.items()}
    out = ops.stack_norm_project(x.to(dtype), 4, lengths=torch.tensor([13, 6]), **low)
    assert out.dtype == dtype
    want = ref.stack_norm_project(x, 4, torch.tensor([13, 6]), "layer", p["norm_weight"], p["norm_bias"], p["w1"],
                                  p["b1"], "gelu", p["w2"], p["b2"])
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("D", [1280, 7])  # a row of 5120 floats (the Eureka width) and one shorter than the 16 lanes
def test_norm_statistics_with_large_mean(norm, D):
    # encoder activations with a large common offset: the row statistics must not lose the small variance
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 10, D, generator=gen) * 0.5 + 100.0
    width = 4 * D
    nw = torch.rand(width, generator=gen) + 0.5
    nb = torch.randn(width, generator=gen) if norm == "layer" else None
    w1 = torch.randn(16, width, generator=gen) / math.sqrt(width)
    got = ops.stack_norm_project(x, 4, norm=norm, norm_weight=nw, norm_bias=nb, w1=w1, activation="silu")
    expected = ref.stack_norm_project(x.double(), 4, None, norm, nw.double(), None if nb is None else nb.double(),
                                      w1.double(), None, "silu", None, None, 1e-5, "stack")
    torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=1e-4)
