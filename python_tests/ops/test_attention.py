"""The encoder's attention op (eureka_fast.ops.attention): compiled CPU kernel vs SDPA."""
import math

import pytest
import torch
import torch.nn.functional as F

from eureka_fast import ops
from eureka_fast.ops import attention as attention_module
from eureka_fast.ops.attention import _kernel_available, attention, reference_attention

compiled = pytest.mark.skipif(ops.backend() != "compiled" or not _kernel_available(torch.device("cpu")),
                              reason="eureka_fast._C with the attention kernel is not built")


@pytest.fixture(autouse=True)
def kernel_on_every_isa(monkeypatch):
    """The wrapper takes SDPA on CPUs without AVX-512; these tests check the kernel itself on every host."""
    monkeypatch.setattr(attention_module, "KERNEL_WITHOUT_AVX512", True)


def qkv(B, H, Tq, Tk, dh, dtype=torch.float32, seed=0, scale=1.0, fused=False):
    gen = torch.Generator().manual_seed(seed)
    if fused:  # the strided views a fused QKV projection gives
        x = torch.randn(B, Tq, 3, H, dh, generator=gen, dtype=dtype).permute(2, 0, 3, 1, 4)
        return x[0] * scale, x[1], x[2]
    return (torch.randn(B, H, Tq, dh, generator=gen, dtype=dtype) * scale,
            torch.randn(B, H, Tk, dh, generator=gen, dtype=dtype),
            torch.randn(B, H, Tk, dh, generator=gen, dtype=dtype))


@compiled
@pytest.mark.parametrize("B,H,Tq,Tk,dh", [
    (1, 6, 1500, 1500, 64),  # Whisper tiny; 1500 is not a multiple of the query block
    (2, 3, 37, 37, 20),      # head_dim not a multiple of 16
    (1, 2, 5, 9, 7),         # Tq != Tk, odd sizes
    (1, 1, 1, 1, 1),         # smallest
    (3, 1, 300, 17, 33),
])
@pytest.mark.parametrize("fused", [False, True])
def test_matches_sdpa(B, H, Tq, Tk, dh, fused):
    if fused and Tq != Tk:
        pytest.skip("fused views have Tq == Tk")
    q, k, v = qkv(B, H, Tq, Tk, dh, fused=fused)
    with torch.inference_mode():
        got = attention(q, k, v)
        expected = reference_attention(q, k, v)
    assert got.shape == (B, H, Tq, dh)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@compiled
def test_key_lengths_mask_ragged():
    q, k, v = qkv(3, 2, 50, 50, 24)
    lengths = torch.tensor([50, 17, 1])
    with torch.inference_mode():
        got = attention(q, k, v, lengths)
        torch.testing.assert_close(got, reference_attention(q, k, v, lengths), atol=2e-5, rtol=1e-4)
        # row b equals attending to its first lengths[b] keys alone
        for b, n in enumerate(lengths.tolist()):
            alone = attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
            torch.testing.assert_close(got[b:b + 1], alone, atol=1e-6, rtol=1e-5)


@compiled
def test_large_scores_and_scale():
    # peaked softmax: most exps fall below the kernel's cutoff, which must not change the result
    q, k, v = qkv(1, 2, 64, 200, 16, scale=30.0)
    with torch.inference_mode():
        torch.testing.assert_close(attention(q, k, v), reference_attention(q, k, v), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(attention(q, k, v, scale=0.01), reference_attention(q, k, v, scale=0.01),
                                   atol=2e-5, rtol=1e-4)


@compiled
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    q, k, v = qkv(1, 2, 33, 33, 8, dtype=dtype)
    with torch.inference_mode():
        got = attention(q, k, v)
        expected = reference_attention(q.double(), k.double(), v.double())
    assert got.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


@compiled
def test_deterministic():
    q, k, v = qkv(1, 3, 400, 400, 32, fused=True)
    with torch.inference_mode():
        assert torch.equal(attention(q, k, v), attention(q, k, v))


@compiled
def test_bad_input_raises():
    q, k, v = qkv(2, 2, 8, 8, 4)
    with pytest.raises(RuntimeError, match="key_lengths must lie in"):
        attention(q, k, v, torch.tensor([0, 8]))
    with pytest.raises(RuntimeError, match="key_lengths must lie in"):
        attention(q, k, v, torch.tensor([9, 8]))
    with pytest.raises(RuntimeError, match="key_lengths must have shape"):
        attention(q, k, v, torch.tensor([8]))
    with pytest.raises(RuntimeError, match="v must have the shape of k"):
        attention(q, k, v[:, :, :5])
    with pytest.raises(RuntimeError, match="k must have shape"):
        attention(q, k[:, :, :, :3], v[:, :, :, :3])
    with pytest.raises(ValueError, match="must be \\[batch, heads, time, head_dim\\]"):
        attention(q[0], k, v)


def test_autograd_goes_through_sdpa():
    q, k, v = qkv(1, 2, 10, 10, 8)
    q.requires_grad_()
    out = attention(q, k, v)
    out.sum().backward()
    expected_grad = torch.autograd.grad(reference_attention(q, k, v).sum(), q)[0]
    torch.testing.assert_close(q.grad, expected_grad)


@compiled
def test_opcheck():
    q, k, v = qkv(2, 2, 6, 6, 4, dtype=torch.float64)
    q_bias = torch.randn(8, dtype=torch.float64)
    torch.library.opcheck(torch.ops.eureka_fast.attention, (q, k, v, torch.tensor([6, 3]), 0.5, q_bias, None),
                          test_utils=("test_schema", "test_faketensor"))
    x = torch.randn(5, 24)
    torch.library.opcheck(torch.ops.eureka_fast.bias_gelu_, (x, torch.randn(24)),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.eureka_fast.add_layer_norm_,
                          (torch.randn(5, 24), torch.randn(24), torch.randn(24), torch.randn(24), 1e-5),
                          test_utils=("test_schema", "test_faketensor"))


@compiled
def test_encoder_with_lengths_equals_each_clip_alone():
    from eureka_fast.models.whisper import WhisperDims, WhisperEncoder

    torch.manual_seed(0)
    dims = WhisperDims(n_mels=8, n_audio_ctx=40, n_audio_state=24, n_audio_head=3, n_audio_layer=2)
    enc = WhisperEncoder(dims).eval()
    mel = torch.randn(2, 8, 80)
    lengths = torch.tensor([80, 37])
    with torch.inference_mode():
        both = enc(mel, lengths)
        short = enc(mel[1:, :, :37])
    torch.testing.assert_close(both[1, :19], short[0], atol=1e-5, rtol=1e-4)
    with torch.enable_grad():  # the autograd path (SDPA with a mask) gives the same function
        torch.testing.assert_close(enc(mel, lengths)[1, :19].detach(), short[0], atol=1e-5, rtol=1e-4)


# ---- the AVX-512 head_dim-64 path (csrc/cpu/attention_avx512.cpp) and its fallbacks --------------------------------

def nan_backed(t: torch.Tensor, extra: int = 4096) -> torch.Tensor:
    """A copy of t (same shape and strides) in the front of a larger NaN buffer: a kernel that reads past the end of
    its operand sees NaN."""
    end = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
    span = t.as_strided((end,), (1,), 0)
    buf = torch.full((span.numel() + extra,), float("nan"), dtype=t.dtype)
    buf[:span.numel()] = span
    return buf.as_strided(t.shape, t.stride(), t.storage_offset())


def reference64(q, k, v, lengths=None, scale=None):
    return reference_attention(q.double(), k.double(), v.double(), lengths, scale).float()


@pytest.fixture()
def nan_outputs():
    """torch.empty (and at::empty inside the op) fill new tensors with NaN: an output element the kernel does not
    write shows up."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


@compiled
@pytest.mark.parametrize("T", [1, 15, 16, 17, 100, 1500])
@pytest.mark.parametrize("dh", [64, 32, 80])
@pytest.mark.parametrize("fused", [False, True])
def test_head_dims_vs_float64(T, dh, fused, nan_outputs):
    B, H = (1, 6) if T == 1500 else (2, 3)
    q, k, v = qkv(B, H, T, T, dh, seed=T + dh, fused=fused)
    q, k, v = nan_backed(q), nan_backed(k), nan_backed(v)
    with torch.inference_mode():
        got = attention(q, k, v)
    assert not got.isnan().any()
    torch.testing.assert_close(got, reference64(q, k, v), atol=3e-6, rtol=1e-5)


@compiled
@pytest.mark.parametrize("Tq,Tk", [(70, 33), (1, 100), (129, 1), (64, 7)])
def test_dh64_cross_lengths(Tq, Tk, nan_outputs):
    q, k, v = qkv(2, 2, Tq, Tk, 64, seed=Tq * Tk)
    q, k, v = nan_backed(q), nan_backed(k), nan_backed(v)
    with torch.inference_mode():
        got = attention(q, k, v)
    torch.testing.assert_close(got, reference64(q, k, v), atol=3e-6, rtol=1e-5)


@compiled
@pytest.mark.parametrize("T", [17, 100, 1500])
def test_dh64_ragged_key_lengths(T, nan_outputs):
    lengths = torch.tensor([T, 1, max(1, T // 3), T - 1])
    x = torch.randn(4, T, 3, 2, 64, generator=torch.Generator().manual_seed(T))  # a fused QKV output
    q, k, v = x.permute(2, 0, 3, 1, 4)
    expected = reference64(q, k, v, lengths)
    # keys at or past an item's length are never read: NaN there must not reach the result
    keep = torch.arange(T)[None, :] < lengths[:, None]  # [B, T]
    poisoned = x.clone()
    poisoned[:, :, 1:].masked_fill_(~keep[:, :, None, None, None], float("nan"))
    poisoned = poisoned.permute(2, 0, 3, 1, 4)
    with torch.inference_mode():
        got = attention(poisoned[0], poisoned[1], poisoned[2], lengths)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, atol=3e-6, rtol=1e-5)


@compiled
@pytest.mark.parametrize("T", [17, 1500])
def test_dh64_head_major_dense_heads(T, nan_outputs):
    # head-major qkv ([B, 3H, T, 64]): q, k, v rows are dense and read in place (no copies); keys past an item's
    # length are never read
    lengths = torch.tensor([T, max(1, T // 3)])
    x = torch.randn(2, 3, 2, T, 64, generator=torch.Generator().manual_seed(T))
    q, k, v = x.transpose(0, 1)
    expected = reference64(q, k, v, lengths)
    poisoned = x.clone()
    poisoned[:, 1:].masked_fill_(~(torch.arange(T)[None, :] < lengths[:, None])[:, None, None, :, None],
                                 float("nan"))
    q, k, v = poisoned.transpose(0, 1)
    assert q.stride(2) == 64 and k.stride(2) == 64
    with torch.inference_mode():
        got = attention(q, k, v, lengths)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, atol=3e-6, rtol=1e-5)


@compiled
def test_dh64_peaked_scores_tiny_values_and_fp_state():
    # most exps fall below the cutoff (exactly 0), which must not change the result
    q, k, v = qkv(1, 2, 80, 300, 64, scale=40.0)
    with torch.inference_mode():
        got = attention(q, k, v)
        sdpa32 = reference_attention(q, k, v)
    exact = reference64(q, k, v)
    # scores of size ~300 carry float32 rounding of ~1e-5 into the exponent: compare with SDPA's own float32 error
    assert (got - exact).abs().max() <= 2 * (sdpa32 - exact).abs().max() + 1e-6
    # values near 1e-36: products below the normal range are flushed (FTZ), an absolute error under 1e-37
    with torch.inference_mode():
        got = attention(q, k, v * 1e-36)
    assert (got.double() - reference64(q, k, v * 1e-36).double()).abs().max().item() < 1e-37
    # the kernel's FTZ/DAZ setting does not leak into the caller's thread
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert (tiny * 1.0).item() > 0 and (tiny + tiny).item() > 1e-39


ISA_SCRIPT = r"""
import torch, sys
sys.path.insert(0, sys.argv[1])
from eureka_fast.ops.attention import attention, reference_attention
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 300, 3, 2, 64, generator=g).permute(2, 0, 3, 1, 4)
lengths = torch.tensor([300, 41])
with torch.inference_mode():
    got = attention(x[0], x[1], x[2], lengths)
ref = reference_attention(x[0].double(), x[1].double(), x[2].double(), lengths).float()
print(float((got - ref).abs().max()))
"""


@compiled
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_dh64_capped_isa_subprocess(isa):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, EUREKA_FAST_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", ISA_SCRIPT, root], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    assert float(out.stdout.strip().splitlines()[-1]) < 3e-6


@compiled
def test_dh64_generic_path_agrees():
    # EUREKA_FAST_ATTENTION_GENERIC=1 (read per call) keeps head_dim 64 on the MKL path: both must agree
    import os

    q, k, v = qkv(1, 2, 200, 200, 64, fused=True)
    with torch.inference_mode():
        fast = attention(q, k, v)
        os.environ["EUREKA_FAST_ATTENTION_GENERIC"] = "1"
        try:
            generic = attention(q, k, v)
        finally:
            del os.environ["EUREKA_FAST_ATTENTION_GENERIC"]
    torch.testing.assert_close(fast, generic, atol=2e-6, rtol=1e-5)


@compiled
@pytest.mark.parametrize("dh", [64, 24])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_q_and_v_bias(dh, with_lengths, nan_outputs):
    # the biases a fused QKV projection can leave to the op: q's folded into the packing of q, v's into the output
    B, H, T = 2, 3, 97
    x = torch.randn(B, T, 3, H, dh, generator=torch.Generator().manual_seed(dh))
    q, k, v = nan_backed(x).permute(2, 0, 3, 1, 4)
    bq, bv = torch.randn(H * dh) * 2, torch.randn(H * dh) * 2
    lengths = torch.tensor([T, 30]) if with_lengths else None
    with torch.inference_mode():
        got = attention(q, k, v, lengths, q_bias=bq, v_bias=bv)
        only_v = attention(q, k, v, lengths, v_bias=bv)
    expected = reference_attention(q.double(), k.double(), v.double(), lengths, q_bias=bq.double(),
                                   v_bias=bv.double())
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(only_v.double(), reference_attention(q.double(), k.double(), v.double(), lengths,
                                                                    v_bias=bv.double()), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="q_bias must have"):
        attention(q, k, v, q_bias=bq[:-1])
    with pytest.raises(RuntimeError, match="v_bias must have"):
        torch.ops.eureka_fast.attention(q, k, v, None, 0.125, None, bv[:-1])


def test_bias_autograd_goes_through_sdpa():
    q, k, v = qkv(1, 2, 10, 10, 8)
    bq = torch.randn(16, requires_grad=True)
    out = attention(q, k, v, q_bias=bq)
    out.sum().backward()
    expected = torch.autograd.grad(reference_attention(q, k, v, q_bias=bq).sum(), bq)[0]
    torch.testing.assert_close(bq.grad, expected)


@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cols", [1536, 37, 16, 1])
def test_bias_gelu_inplace(dtype, cols):
    # the encoder's fc1 epilogue: x = gelu(x + bias), exact-erf GELU; a strided row view must keep its other columns
    gen = torch.Generator().manual_seed(cols)
    base = torch.randn(300, cols + 5, generator=gen, dtype=dtype) * 4
    x = base[:, :cols]
    bias = torch.randn(cols, generator=gen, dtype=dtype)
    expected = F.gelu(x.double() + bias.double())
    untouched = base[:, cols:].clone()
    out = torch.ops.eureka_fast.bias_gelu_(x, bias)
    assert out.data_ptr() == x.data_ptr()
    tol = 1e-12 if dtype == torch.float64 else 3e-6
    torch.testing.assert_close(x.double(), expected, atol=tol, rtol=tol)
    assert torch.equal(base[:, cols:], untouched)
    with pytest.raises(RuntimeError, match="bias must have"):
        torch.ops.eureka_fast.bias_gelu_(x, bias[:-1] if cols > 1 else torch.zeros(2, dtype=dtype))


@compiled
def test_bias_gelu_and_add_layer_norm_capped_isa_subprocess():
    import os
    import subprocess
    import sys

    script = r"""
import sys, torch, torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
from eureka_fast.ops import registry
registry.load_extension()
x = torch.randn(64, 100) * 4
b = torch.randn(100)
expected = F.gelu(x.double() + b.double())
err = (torch.ops.eureka_fast.bias_gelu_(x, b).double() - expected).abs().max()
h = torch.randn(50, 100)
w, lb = torch.randn(100), torch.randn(100)
ln = torch.nn.functional.layer_norm(h.double() + b.double(), (100,), w.double(), lb.double(), 1e-5)
err = max(err, (torch.ops.eureka_fast.add_layer_norm_(h, b, w, lb, 1e-5).double() - ln).abs().max())
print(float(err))
"""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for isa in ("avx2", "baseline"):
        out = subprocess.run([sys.executable, "-c", script, root], env=dict(os.environ, EUREKA_FAST_CPU_ISA=isa),
                             capture_output=True, text=True, check=True, timeout=300)
        assert float(out.stdout.strip().splitlines()[-1]) < 3e-6


@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [384, 512, 37, 16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_add_layer_norm_inplace(dtype, d, with_bias, nan_outputs):
    # the encoder's residual bias add fused with the next LayerNorm: x += bias in place, returns LN(x)
    gen = torch.Generator().manual_seed(d)
    x = (torch.randn(2, 150, d, generator=gen, dtype=dtype) * 3 + 1)
    bias = torch.randn(d, generator=gen, dtype=dtype) if with_bias else None
    w, b = torch.randn(d, generator=gen, dtype=dtype), torch.randn(d, generator=gen, dtype=dtype)
    updated = x.double() + (bias.double() if with_bias else 0)
    expected = F.layer_norm(updated, (d,), w.double(), b.double(), 1e-5)
    y = torch.ops.eureka_fast.add_layer_norm_(x, bias, w, b, 1e-5)
    tol = 1e-12 if dtype == torch.float64 else 5e-6
    torch.testing.assert_close(y.double(), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(x.double(), updated, atol=tol, rtol=0)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.eureka_fast.add_layer_norm_(x, bias, w[:-1], b, 1e-5)


def test_encoder_scratch_buffers_across_grad_modes():
    # the inference path's per-thread scratch buffers are made once and reused: first under inference_mode, then
    # under no_grad (an inference tensor could not be written there), then with autograd recording
    from eureka_fast.models.whisper import WhisperDims, WhisperEncoder

    torch.manual_seed(0)
    enc = WhisperEncoder(WhisperDims(n_mels=8, n_audio_ctx=40, n_audio_state=64, n_audio_head=1,
                                     n_audio_layer=2)).eval()
    mel = torch.randn(1, 8, 80)
    with torch.inference_mode():
        first = enc(mel)
    with torch.no_grad():
        second = enc(mel)
    third = enc(mel)
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    torch.testing.assert_close(third.detach(), first, atol=1e-5, rtol=1e-4)


@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_out_variants_write_the_given_buffer(dtype):
    # attention_out / add_layer_norm_out: the same results as the allocating ops, written into the caller's buffer
    # (the encoder's scratch), every element written (NaN-poisoned), wrong buffers refused
    q, k, v = qkv(2, 3, 70, 70, 64, dtype=dtype, fused=True)
    q_bias, v_bias = torch.randn(192, dtype=dtype), torch.randn(192, dtype=dtype)
    lens = torch.tensor([70, 33])
    expected = torch.ops.eureka_fast.attention(q, k, v, lens, 0.125, q_bias, v_bias)
    out = torch.full((2, 70, 3, 64), float("nan"), dtype=dtype)
    got = torch.ops.eureka_fast.attention_out(q, k, v, lens, 0.125, q_bias, v_bias, out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    with torch.inference_mode():
        view = attention(q, k, v, lens, 0.125, q_bias=q_bias, v_bias=v_bias, out=out.fill_(float("nan")))
    assert view.data_ptr() == out.data_ptr()
    torch.testing.assert_close(view, expected.transpose(1, 2), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.eureka_fast.attention_out(q, k, v, lens, 0.125, None, None, torch.empty(2, 70, 3, 63, dtype=dtype))

    x = torch.randn(37, 100, dtype=dtype)
    bias, w, b = (torch.randn(100, dtype=dtype) for _ in range(3))
    x2 = x.clone()
    expected = torch.ops.eureka_fast.add_layer_norm_(x, bias, w, b, 1e-5)
    y = torch.full((37, 100), float("nan"), dtype=dtype)
    got = torch.ops.eureka_fast.add_layer_norm_out(x2, bias, w, b, 1e-5, y)
    assert got.data_ptr() == y.data_ptr()
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    torch.testing.assert_close(x2, x, atol=0, rtol=0)  # the bias was added in place to both
    with pytest.raises(RuntimeError, match="out must"):
        torch.ops.eureka_fast.add_layer_norm_out(x2, None, w, b, 1e-5, x2)
    torch.library.opcheck(torch.ops.eureka_fast.add_layer_norm_out,
                          (torch.randn(5, 24), torch.randn(24), torch.randn(24), torch.randn(24), 1e-5,
                           torch.empty(5, 24)), test_utils=("test_schema", "test_faketensor"))
    qs, ks, vs = qkv(1, 2, 6, 6, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.eureka_fast.attention_out,
                          (qs, ks, vs, None, 0.5, None, None, torch.empty(1, 6, 2, 4, dtype=torch.float64)),
                          test_utils=("test_schema", "test_faketensor"))


@compiled
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_wrapper_takes_sdpa_without_avx512(monkeypatch, isa):
    monkeypatch.setattr(attention_module, "KERNEL_WITHOUT_AVX512", False)
    monkeypatch.setattr(attention_module.registry, "cpu_isa", lambda: isa)
    calls = []
    kernel = torch.ops.eureka_fast.attention
    monkeypatch.setattr(attention_module.torch.ops.eureka_fast, "attention",
                        lambda *a: calls.append(1) or kernel(*a), raising=False)
    q, k, v = qkv(2, 3, 40, 40, 64)
    with torch.inference_mode():
        got = attention(q, k, v, torch.tensor([40, 13]))
        expected = reference_attention(q, k, v, torch.tensor([40, 13]))
    if isa == "avx512":
        assert calls == [1]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    else:
        assert calls == []
        assert torch.equal(got, expected)  # SDPA itself, not an approximation of it
