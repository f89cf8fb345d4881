"""The encoder's attention op (eureka_fast.ops.attention): compiled CPU kernel vs SDPA."""
import math

import pytest
import torch
import torch.nn.functional as F

from eureka_fast import ops
from eureka_fast.ops.attention import _kernel_available, attention, reference_attention

compiled = pytest.mark.skipif(ops.backend() != "compiled" or not _kernel_available(torch.device("cpu")),
                              reason="eureka_fast._C with the attention kernel is not built")


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
    torch.library.opcheck(torch.ops.eureka_fast.attention, (q, k, v, torch.tensor([6, 3]), 0.5),
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
