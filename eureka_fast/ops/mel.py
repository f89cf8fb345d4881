"""The log-mel front end's power spectrum -> mel filter bank -> floor (``eureka_fast.audio.log_mel``): the compiled CPU
kernel ``torch.ops.eureka_fast.mel_power`` (one pass, csrc/cpu/mel.cpp), with a pure-PyTorch reference that runs
wherever the kernel does not (no extension, other devices or dtypes, autograd).

``mel_power(spectrum, filters, floor)`` takes a complex spectrum [F, bins] (an rfft of F frames) and a filter bank
[n_mels, bins] and returns [n_mels, F] = max(floor, filters @ |spectrum|^2 transposed).
"""
from __future__ import annotations

import torch

from . import registry


def _register_fakes() -> None:
    if hasattr(torch.ops.eureka_fast, "mel_power"):
        @torch.library.register_fake("eureka_fast::mel_power")
        def _(spectrum, filters, floor):
            return spectrum.new_empty((filters.shape[0], spectrum.shape[0]))


registry.on_load(_register_fakes, ("mel_power",))


def _kernel_available(device: torch.device) -> bool:
    return registry.use_kernel("mel_power", device)


def reference_mel_power(spectrum: torch.Tensor, filters: torch.Tensor, floor: float) -> torch.Tensor:
    """The same function in PyTorch (differentiable): [n_mels, F]."""
    power = torch.view_as_real(spectrum).square().sum(-1)  # |z|^2 [F, bins]
    return (filters.to(power.dtype) @ power.t()).clamp_(min=floor)


def mel_power(spectrum: torch.Tensor, filters: torch.Tensor, floor: float, *,
              use_reference: bool = False) -> torch.Tensor:
    """max(floor, filters @ |spectrum|^2 transposed): spectrum complex [F, bins], filters real [n_mels, bins] ->
    [n_mels, F] in the spectrum's real dtype. The compiled kernel runs for complex64 CPU spectra with float32 filters
    when autograd does not record the call; the reference otherwise."""
    if not isinstance(spectrum, torch.Tensor) or not spectrum.is_complex() or spectrum.dim() != 2:
        raise ValueError("spectrum must be a complex [frames, bins] tensor, got %s" % (
            f"{spectrum.dtype} {tuple(spectrum.shape)}" if isinstance(spectrum, torch.Tensor)
            else type(spectrum).__name__))
    if not isinstance(filters, torch.Tensor) or filters.dim() != 2 or filters.is_complex():
        raise ValueError("filters must be a real [n_mels, bins] tensor")
    if filters.shape[1] != spectrum.shape[1]:
        raise ValueError(f"filters have {filters.shape[1]} bins, the spectrum {spectrum.shape[1]}")
    needs_grad = torch.is_grad_enabled() and (spectrum.requires_grad or filters.requires_grad)
    if (use_reference or needs_grad or spectrum.device.type != "cpu" or spectrum.dtype != torch.complex64
            or filters.dtype != torch.float32 or filters.device != spectrum.device
            or not _kernel_available(spectrum.device)):
        return reference_mel_power(spectrum, filters, floor)
    return torch.ops.eureka_fast.mel_power(torch.view_as_real(spectrum), filters, float(floor))
