"""eureka_fast.ops.mel.mel_power (power spectrum -> mel -> floor, the log-mel front end's kernel) against a float64
computation written here, on the real Slaney filter banks (80 and 128 mels) and on a synthetic one; its AVX-512 and
portable copies against each other; floors, NaN, odd frame counts, strides and bad input."""
import os
import subprocess
import sys

import pytest
import torch

from eureka_fast.audio.features import mel_filters
from eureka_fast.ops import registry
from eureka_fast.ops.mel import mel_power, reference_mel_power

pytestmark = pytest.mark.usefixtures("poisoned_empty_tensors")
compiled = pytest.mark.skipif(not registry.load_extension() or not hasattr(torch.ops.eureka_fast, "mel_power"),
                              reason="compiled kernels not built")
FLOOR = 1e-10


def spectrum_of(frames: int, seed: int = 0, n_fft: int = 400) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.fft.rfft(torch.randn(frames, n_fft, generator=g) * 0.1, dim=-1)


def expected_mel(spectrum: torch.Tensor, filters: torch.Tensor, floor: float) -> torch.Tensor:
    z = spectrum.to(torch.complex128)
    power = z.real ** 2 + z.imag ** 2
    return (filters.double() @ power.t()).clamp(min=floor)


@compiled
@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("frames", [1, 7, 15, 16, 17, 31, 3000])
def test_matches_float64(n_mels, frames):
    spectrum, filters = spectrum_of(frames, seed=frames), mel_filters(n_mels, "cpu")
    got = mel_power(spectrum, filters, FLOOR)
    assert got.shape == (n_mels, frames) and got.dtype == torch.float32
    expected = expected_mel(spectrum, filters, FLOOR)
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=0)
    torch.testing.assert_close(reference_mel_power(spectrum, filters, FLOOR).double(), expected, rtol=2e-6, atol=0)


@compiled
def test_synthetic_filters_wide_bands_empty_rows_and_strides():
    # bands of every width (one bin, the whole spectrum), an all-zero filter, a non-contiguous spectrum and filters
    g = torch.Generator().manual_seed(3)
    bins = 33
    filters = torch.zeros(6, bins)
    filters[0, 5] = 0.7
    filters[1] = torch.rand(bins, generator=g)
    filters[3, 10:20] = torch.rand(10, generator=g)
    filters[4, 0] = 1.0
    filters[5, bins - 1] = 2.0
    filters_t = filters.t().contiguous().t()  # same values, strides (1, 6)
    spectrum = torch.fft.rfft(torch.randn(40, 64, generator=g), dim=-1)[::2]  # 20 frames, every other row
    got = mel_power(spectrum, filters_t, 0.25)
    expected = expected_mel(spectrum, filters, 0.25)
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=0)
    assert torch.all(got[2] == 0.25)  # the all-zero filter gives the floor


@compiled
def test_silence_gives_the_floor_and_nan_propagates():
    filters = mel_filters(80, "cpu")
    silent = torch.zeros(20, 201, dtype=torch.complex64)
    assert torch.all(mel_power(silent, filters, FLOOR) == torch.tensor(FLOOR, dtype=torch.float32))
    spectrum = spectrum_of(20)
    spectrum[3, 40] = complex(float("nan"), 0.0)
    got = mel_power(spectrum, filters, FLOOR)
    # the filters that use bin 40 are NaN in frame 3 and nothing else is (the reference's dense GEMM makes every
    # filter of frame 3 NaN through 0 * NaN; a NaN bin cannot come from checked audio anyway)
    touched = filters[:, 40] != 0
    assert touched.any()
    expected = torch.zeros_like(got, dtype=torch.bool)
    expected[touched, 3] = True
    assert torch.equal(torch.isnan(got), expected)
    assert torch.isnan(reference_mel_power(spectrum, filters, FLOOR)[:, 3]).all()


@compiled
def test_avx512_and_portable_copies_agree_bit_for_bit():
    script = """
import sys, hashlib, torch
sys.path.insert(0, sys.argv[1])
from eureka_fast.audio.features import mel_filters
g = torch.Generator().manual_seed(7)
for frames in (1, 9, 16, 3000):
    s = torch.fft.rfft(torch.randn(frames, 400, generator=g), dim=-1)
    print(hashlib.sha1(torch.ops.eureka_fast.mel_power(torch.view_as_real(s), mel_filters(128, "cpu"), 1e-10)
                       .numpy().tobytes()).hexdigest())
"""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    runs = [subprocess.run([sys.executable, "-c", script, root], env=dict(os.environ, EUREKA_FAST_CPU_ISA=isa),
                           capture_output=True, text=True, check=True, timeout=300).stdout.split()
            for isa in ("avx512", "baseline")]
    assert len(runs[0]) == 4 and runs[0] == runs[1]


def test_reference_path_and_autograd():
    spectrum = spectrum_of(12).requires_grad_(True)
    filters = mel_filters(80, "cpu")
    got = mel_power(spectrum, filters, FLOOR)  # autograd records: the reference runs
    got.sum().backward()
    assert spectrum.grad is not None and spectrum.grad.shape == spectrum.shape
    torch.testing.assert_close(mel_power(spectrum.detach(), filters, FLOOR, use_reference=True).double(),
                               expected_mel(spectrum.detach(), filters, FLOOR), rtol=2e-6, atol=0)


def test_bad_input_is_named():
    filters = mel_filters(80, "cpu")
    with pytest.raises(ValueError, match="complex"):
        mel_power(torch.randn(10, 201), filters, FLOOR)
    with pytest.raises(ValueError, match="complex"):
        mel_power(spectrum_of(4)[None], filters, FLOOR)
    with pytest.raises(ValueError, match="201 bins, the spectrum 200"):
        mel_power(spectrum_of(4)[:, :200], filters, FLOOR)
    with pytest.raises(ValueError, match="filters"):
        mel_power(spectrum_of(4), filters[0], FLOOR)


@compiled
def test_compiled_op_checks_its_arguments():
    op = torch.ops.eureka_fast.mel_power
    z = torch.view_as_real(spectrum_of(4))
    filters = mel_filters(80, "cpu")
    with pytest.raises(RuntimeError, match=r"\[frames, bins, 2\]"):
        op(z[..., :1], filters, FLOOR)
    with pytest.raises(RuntimeError, match="float32"):
        op(z.double(), filters, FLOOR)
    with pytest.raises(RuntimeError, match="bins"):
        op(z[:, :100], filters, FLOOR)
    with pytest.raises(RuntimeError, match="floor must be finite"):
        op(z, filters, float("inf"))
    assert op(z[:0], filters, FLOOR).shape == (80, 0)


@compiled
def test_fake_impl_gives_the_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mel_power(spectrum_of(2), mel_filters(80, "cpu"), FLOOR)  # registers the fake impl
    with FakeTensorMode() as mode:
        z = mode.from_tensor(torch.view_as_real(spectrum_of(5)))
        out = torch.ops.eureka_fast.mel_power(z, mode.from_tensor(mel_filters(80, "cpu")), FLOOR)
    assert out.shape == (80, 5) and out.dtype == torch.float32


@compiled
def test_opcheck():
    mel_power(spectrum_of(2), mel_filters(80, "cpu"), FLOOR)  # registers the fake impl
    torch.library.opcheck(torch.ops.eureka_fast.mel_power,
                          (torch.view_as_real(spectrum_of(19)), mel_filters(80, "cpu"), FLOOR))
