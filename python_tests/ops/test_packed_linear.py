"""eureka_fast::linear_pack / packed_linear_ (csrc/cpu/linear_avx512.cpp), the encoder's GEMM with its epilogue,
against a float64 reference."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from eureka_fast import ops
from eureka_fast.ops.attention import _kernel_available

compiled = pytest.mark.skipif(ops.backend() != "compiled" or not _kernel_available(torch.device("cpu"))
                              or not hasattr(torch.ops.eureka_fast, "packed_linear_"),
                              reason="eureka_fast._C with the packed linear kernel is not built")


def reference(out, x, w, bias, accumulate, gelu):
    r = x.double() @ w.double().t()
    if accumulate:
        r = r + out.double()
    if bias is not None:
        r = r + bias.double()
    return F.gelu(r) if gelu else r


def pack(w):
    packed = torch.ops.eureka_fast.linear_pack(w)
    if packed.numel() == 0:
        pytest.skip("no AVX-512 here: linear_pack declines")
    return packed


@compiled
@pytest.mark.parametrize("m,k,n", [
    (1500, 384, 1536),  # Whisper tiny fc1 (1500 rows: not a multiple of the 6-row tile)
    (301, 1536, 384),   # fc2-like, K blocked to ~1 MB of packed weight per column block
    (7, 100, 77),       # odd sizes: a partial 16-column vector, a 5-row tail
    (1, 1, 1),
    (13, 33, 130),      # a last panel of 2 columns
    (6, 16, 64),
])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("accumulate,gelu", [(False, False), (False, True), (True, False), (True, True)])
def test_matches_float64(m, k, n, with_bias, accumulate, gelu):
    gen = torch.Generator().manual_seed(m * 7 + k + n)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    bias = torch.randn(n, generator=gen) if with_bias else None
    # out is a column slice of a wider buffer: the columns outside it must stay untouched
    base = torch.randn(m, n + 3, generator=gen)
    out = base[:, :n]
    if not accumulate:
        out.fill_(float("nan"))  # poisoned: every element must be written
    expected = reference(out, x, w, bias, accumulate, gelu)
    untouched = base[:, n:].clone()
    got = torch.ops.eureka_fast.packed_linear_(out, x, pack(w), bias, accumulate, gelu)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)
    assert torch.equal(base[:, n:], untouched)


@compiled
def test_strided_rows_and_errors():
    # x rows may overlap (the conv stem's im2col views read a time-major buffer in place)
    buf = torch.randn(40, 8)
    x = buf.as_strided((19, 24), (16, 1))  # row t = buffer rows 2t..2t+2
    w = torch.randn(10, 24)
    out = torch.full((19, 10), float("nan"))
    torch.ops.eureka_fast.packed_linear_(out, x, pack(w), None, False, False)
    torch.testing.assert_close(out.double(), x.double() @ w.double().t(), atol=2e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="packed must be"):
        torch.ops.eureka_fast.packed_linear_(torch.empty(19, 17), x, pack(w), None, False, False)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.eureka_fast.packed_linear_(out, x, pack(w), torch.zeros(9), False, False)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.eureka_fast.packed_linear_(out.double(), x.double(), pack(w).double(), None, False, False)
    assert torch.ops.eureka_fast.linear_pack(w.double()).numel() == 0  # float64: the caller keeps BLAS
    assert torch.ops.eureka_fast.linear_pack(torch.randn(3, 1537)).numel() == 0  # K > 1536: BLAS is faster
    assert torch.ops.eureka_fast.linear_pack(torch.randn(3, 1536)).numel() == 1536 * 16
    square = torch.randn(12, 12)
    with pytest.raises(RuntimeError, match="memory location"):  # out written while x is still read
        torch.ops.eureka_fast.packed_linear_(square, square, pack(torch.randn(12, 12)), None, False, False)


def pack_in_python(w):
    """linear_pack's layout: 64-column panels, each k-major [K][width] (width: the panel's columns rounded up to
    16, zero-padded)."""
    n, k = w.shape
    parts = []
    for col in range(0, n, 64):
        cols = min(64, n - col)
        panel = torch.zeros(k, (cols + 15) // 16 * 16, dtype=w.dtype)
        panel[:, :cols] = w[col:col + cols].t()
        parts.append(panel.reshape(-1))
    return torch.cat(parts)


@compiled
def test_python_packing_matches_linear_pack():
    w = torch.randn(130, 33)
    assert torch.equal(pack_in_python(w), pack(w))


@compiled
@pytest.mark.parametrize("m,k,n", [
    (1500, 512, 512),  # base out-proj: the whole weight in one column block, rows normalised per tile
    (301, 384, 384),   # tiny
    (13, 768, 768),    # a weight past one block: the GEMM, then a LayerNorm pass
    (7, 40, 100),      # a partial last panel and vector, a 1-row tail tile
    (1, 3, 1),
])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_norm_matches_float64(m, k, n, with_bias):
    gen = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    bias = torch.randn(n, generator=gen) if with_bias else None
    lw, lb = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    base = torch.randn(m, n + 5, generator=gen) * 3 + 1  # out: a column slice, its neighbours untouched
    out = base[:, :n]
    stream = reference(out, x, w, bias, True, False)
    expected = F.layer_norm(stream, (n,), lw.double(), lb.double(), 1e-5)
    untouched = base[:, n:].clone()
    normed = torch.full((m, n), float("nan"))  # poisoned: every element must be written
    got = torch.ops.eureka_fast.packed_linear_norm_(out, x, pack(w), bias, lw, lb, 1e-5, normed)
    assert got.data_ptr() == normed.data_ptr()
    torch.testing.assert_close(out.double(), stream, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(normed.double(), expected, atol=5e-5, rtol=1e-5)
    assert torch.equal(base[:, n:], untouched)
    # the same row kernel (and rounding) as add_layer_norm_out, which it replaces after the GEMM
    again = torch.ops.eureka_fast.add_layer_norm_out(out.clone(), None, lw, lb, 1e-5, torch.empty(m, n))
    assert torch.equal(normed, again)


@compiled
def test_linear_norm_errors():
    x, w = torch.randn(9, 20), torch.randn(18, 20)
    out, normed, lw = torch.randn(9, 18), torch.empty(9, 18), torch.ones(18)
    op = torch.ops.eureka_fast.packed_linear_norm_
    with pytest.raises(RuntimeError, match="ln_weight and ln_bias must be"):
        op(out, x, pack(w), None, lw[:-1], lw, 1e-5, normed)
    with pytest.raises(RuntimeError, match="normed must be"):
        op(out, x, pack(w), None, lw, lw, 1e-5, torch.empty(9, 17))
    with pytest.raises(RuntimeError, match="eps must be"):
        op(out, x, pack(w), None, lw, lw, float("nan"), normed)
    with pytest.raises(RuntimeError, match="memory location"):
        op(out, x, pack(w), None, lw, lw, 1e-5, out)
    torch.library.opcheck(op, (out, x, pack(w), torch.randn(18), lw, torch.zeros(18), 1e-5, normed),
                          test_utils=("test_schema", "test_faketensor"))


@compiled
def test_opcheck():
    x, w = torch.randn(9, 20), torch.randn(18, 20)
    packed = pack(w)
    torch.library.opcheck(torch.ops.eureka_fast.linear_pack, (w,), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.eureka_fast.packed_linear_, (torch.randn(9, 18), x, packed, torch.randn(18),
                                                                 True, True),
                          test_utils=("test_schema", "test_faketensor"))


@compiled
def test_capped_isa_subprocess():
    # without AVX-512: linear_pack declines (whisper.py keeps MKL); a weight packed before still computes right
    script = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from eureka_fast.ops import registry
registry.load_extension()
print(torch.ops.eureka_fast.linear_pack(torch.randn(5, 3)).numel())
"""
    # and the portable paths of packed_linear_ / packed_linear_norm_ (ATen on the unpacked weight)
    portable = r"""
import sys, torch, torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
from eureka_fast.ops import registry
from test_packed_linear import pack_in_python
registry.load_extension()
g = torch.Generator().manual_seed(0)
x, w, b = torch.randn(13, 40, generator=g), torch.randn(130, 40, generator=g), torch.randn(130, generator=g)
out = torch.randn(13, 130, generator=g)
expected = F.gelu(out.double() + x.double() @ w.double().t() + b.double())
torch.ops.eureka_fast.packed_linear_(out, x, pack_in_python(w), b, True, True)
err = (out.double() - expected).abs().max().item()
w = torch.randn(192, 40, generator=g)
lw, lb, normed = torch.randn(192, generator=g), torch.randn(192, generator=g), torch.full((13, 192), float("nan"))
stream = torch.randn(13, 192, generator=g)
expected = stream.double() + x.double() @ w.double().t()
torch.ops.eureka_fast.packed_linear_norm_(stream, x, pack_in_python(w), None, lw, lb, 1e-5, normed)
expected_norm = F.layer_norm(expected, (192,), lw.double(), lb.double(), 1e-5)
err = max(err, (stream.double() - expected).abs().max().item(), (normed.double() - expected_norm).abs().max().item())
print(err)
"""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for isa in ("avx2", "baseline"):
        out = subprocess.run([sys.executable, "-c", script, root], env=dict(os.environ, EUREKA_FAST_CPU_ISA=isa),
                             capture_output=True, text=True, check=True, timeout=300)
        assert out.stdout.strip().splitlines()[-1] == "0"
        out = subprocess.run([sys.executable, "-c", portable, root, os.path.dirname(os.path.abspath(__file__))],
                             env=dict(os.environ, EUREKA_FAST_CPU_ISA=isa), capture_output=True, text=True,
                             check=True, timeout=300)
        assert float(out.stdout.strip().splitlines()[-1]) < 1e-4


@compiled
def test_encoder_repacks_changed_weights():
    # the packed copies are cached on the layers: an in-place weight update or a swapped tensor must be seen
    from eureka_fast.models.whisper import WhisperDims, WhisperEncoder

    torch.manual_seed(0)
    dims = WhisperDims(n_audio_state=128, n_audio_head=2, n_audio_layer=2, n_audio_ctx=50)
    enc = WhisperEncoder(dims).eval()
    mel = torch.randn(2, 80, 100)

    def both():
        with torch.inference_mode():
            fast = enc(mel)
        with torch.enable_grad():
            enc.requires_grad_(True)
            slow = enc(mel).detach()  # autograd path: plain nn.Linear / conv / SDPA
            enc.requires_grad_(False)
        return fast, slow

    fast, slow = both()
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        enc.layers[0].fc1.weight.mul_(1.5)
        enc.layers[1].attn.qkv_weight.add_(0.01)
        enc.conv2.weight.mul_(0.5)
    enc.layers[1].fc2.weight = torch.nn.Parameter(torch.randn_like(enc.layers[1].fc2.weight) * 0.02)
    fast2, slow2 = both()
    assert (slow2 - slow).abs().max() > 1e-2
    torch.testing.assert_close(fast2, slow2, atol=1e-4, rtol=1e-4)


@compiled
@pytest.mark.parametrize("frames,lengths", [(3000, None), (99, [99, 50]), (8, [1, 8])])
def test_conv_stem_matches_float64(frames, lengths):
    # the inference stem (two im2col GEMMs reading a time-major buffer in place) vs the Conv1d modules in float64,
    # with the masking forward applies for `lengths`
    from eureka_fast.models.whisper import WhisperDims, WhisperEncoder

    torch.manual_seed(frames)
    dims = WhisperDims(n_audio_state=64, n_audio_head=1, n_audio_layer=1)
    enc = WhisperEncoder(dims).eval()
    mel = torch.randn(2, 80, frames)
    lens = None if lengths is None else torch.tensor(lengths)
    with torch.inference_mode():
        got = enc._packed_stem(mel, lens)
        if got is None:
            pytest.skip("no packed kernel here")
        ref = enc.double()
        m = mel.double()
        valid = torch.ones(2, frames, dtype=torch.bool) if lens is None else torch.arange(frames) < lens[:, None]
        h = F.gelu(ref.conv1(m * valid[:, None])) * valid[:, None]
        expected = F.gelu(ref.conv2(h)).transpose(1, 2)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@compiled
def test_conv_stem_keeps_autograd_for_any_trainable_stem_parameter():
    from eureka_fast.models.whisper import WhisperDims, WhisperEncoder

    torch.manual_seed(0)
    dims = WhisperDims(n_audio_state=64, n_audio_head=1, n_audio_layer=1, n_audio_ctx=20)
    enc = WhisperEncoder(dims)
    enc.requires_grad_(False)
    enc.conv1.bias.requires_grad_(True)  # only conv1's bias trains: the packed (no-autograd) stem must not run
    enc(torch.randn(1, 80, 40)).sum().backward()
    assert enc.conv1.bias.grad is not None and enc.conv1.bias.grad.abs().sum() > 0


def test_large_weights_keep_the_blas_path():
    # the packed cache doubles a weight's memory: only weights up to _PACK_MAX_BYTES are packed
    from eureka_fast.models.whisper import encoder as whisper
    from eureka_fast.ops import registry

    layer = torch.nn.Linear(1, 1)
    x = torch.randn(3, 8)
    small = torch.randn(16, 8)
    big = torch.empty(whisper._PACK_MAX_BYTES // 4 // 8 + 1, 8)
    assert whisper._packed_weight(layer, "big", big, x) is None
    if registry.cpu_kernel_runs("packed_linear_", x) and ops.backend() == "compiled":
        packed = whisper._packed_weight(layer, "small", small, x)
        if torch.ops.eureka_fast.linear_pack(small).numel():  # the kernel runs on this CPU
            assert packed is not None
