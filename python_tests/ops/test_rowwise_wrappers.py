"""The Python wrappers of the encoder's in-place kernels (eureka_fast.ops.rowwise, eureka_fast.ops.packed_linear):
the same function on the compiled path (float32 / float64 on CPU) and on the ATen fallback (other dtypes), against
float64 references."""
import pytest
import torch
import torch.nn.functional as F

from eureka_fast.ops import packed_linear, registry, rowwise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_bias_gelu_in_place(dtype):
    g = torch.Generator().manual_seed(0)
    x, bias = (torch.randn(37, 24, generator=g) * 3).to(dtype), torch.randn(24, generator=g).to(dtype)
    expected = F.gelu(x.double() + bias.double())
    out = rowwise.bias_gelu_(x, bias)
    assert out.data_ptr() == x.data_ptr()  # in place
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), expected, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_out", [False, True])
def test_add_layer_norm_adds_the_bias_in_place_and_returns_the_norm(dtype, with_out):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 11, 48, generator=g).to(dtype)
    bias, w, b = (torch.randn(48, generator=g).to(dtype) for _ in range(3))
    stream = x.double() + bias.double()
    expected = F.layer_norm(stream, (48,), w.double(), b.double(), 1e-5)
    out = torch.empty_like(x) if with_out else None
    normed = rowwise.add_layer_norm_(x, bias, w, b, 1e-5, out=out)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(x.double(), stream, atol=tol, rtol=tol)  # the residual stream took the bias
    torch.testing.assert_close(normed.double(), expected, atol=tol * 4, rtol=tol)
    if with_out and registry.cpu_kernel_runs("add_layer_norm_out", x):
        assert normed.data_ptr() == out.data_ptr()


def test_gelu_in_place():
    x = torch.randn(5, 7)
    expected = F.gelu(x)
    assert rowwise.gelu_(x) is x and torch.equal(x, expected)


def test_linear_pack_declines_what_its_kernel_cannot_run():
    # float64 never packs (the caller keeps BLAS); without the kernel nothing does
    assert packed_linear.linear_pack(torch.randn(8, 4, dtype=torch.float64)).numel() == 0


def test_packed_linear_without_its_kernel_says_so(monkeypatch):
    monkeypatch.setattr(registry, "use_kernel", lambda *args, **kwargs: False)
    assert packed_linear.linear_pack(torch.randn(8, 4)).numel() == 0
    with pytest.raises(RuntimeError, match="packed_linear_ needs the compiled extension"):
        packed_linear.packed_linear_(torch.empty(2, 8), torch.randn(2, 4), torch.empty(0))
    with pytest.raises(RuntimeError, match="packed_linear_norm_ needs the compiled extension"):
        packed_linear.packed_linear_norm_(torch.empty(2, 8), torch.randn(2, 4), torch.empty(0), None,
                                          torch.ones(8), torch.zeros(8), 1e-5, torch.empty(2, 8))
