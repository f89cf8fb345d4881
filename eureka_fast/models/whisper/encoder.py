"""Whisper audio encoder: the function of openai-whisper's `AudioEncoder`, built for speed.

Conv stem (k3 + GELU, k3 stride 2 + GELU), sinusoidal positions, pre-LN transformer blocks, final LayerNorm. The q/k/v
projections are one fused GEMM (the key projection has no bias in Whisper; the fused bias keeps a constant zero block
for it, so training cannot give it one). With autograd, attention is `scaled_dot_product_attention`; inference
without autograd updates the residual stream in place on the CPU kernels behind eureka_fast.ops (attention that adds
q's and v's biases itself, packed-weight GEMMs with fused epilogues, bias + GELU, add + LayerNorm), with qkv and the
MLP hidden in per-thread scratch buffers. Inputs shorter than 3000 frames are accepted (positions sliced); with
`lengths`, padded frames are masked so each item's valid outputs equal running it alone, unpadded.

Inside `int8_linears()` the transformer layers' projections (and the decoder's, see decoding.py) run as dynamic int8
GEMMs instead: weights quantised once per output channel, activations per row on each call (torch's
`quantized::linear_dynamic`), the convolution stem, LayerNorms and attention staying float32.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import packed_linear, registry, rowwise
from ...ops.attention import attention as attention_op
from ...ops.scratch import scratch

__all__ = ["WhisperDims", "WhisperEncoder", "sinusoids", "encoder_flops", "int8_linears", "int8_enabled",
           "int8_linear"]


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
# Dynamic int8 projections (opt-in, like faster-whisper's compute_type="int8")

_INT8 = contextvars.ContextVar("eureka_fast_whisper_int8", default=False)


@contextlib.contextmanager
def int8_linears(enabled: bool = True):
    """Within this block (this thread / task), Whisper's encoder layers and decoder run their projections as dynamic
    int8 GEMMs (`int8_linear`). A context variable rather than a module flag: one model serves int8 and float32
    calls side by side, and the Eureka model's encoder is never affected."""
    token = _INT8.set(bool(enabled))
    try:
        yield
    finally:
        _INT8.reset(token)


def int8_enabled() -> bool:
    return _INT8.get()


@functools.lru_cache(maxsize=None)
def _reduce_range() -> bool:
    """7-bit activations where int8 GEMMs use vpmaddubsw (its int16 sums can saturate with 8 bits), full 8 bits on
    CPUs with VNNI (exact int32 dot products)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return True
    return not ("avx512_vnni" in flags or "avx_vnni" in flags)


def _int8_packed(module: nn.Module, name: str, weight: Tensor):
    """`weight` [out, in] quantised to int8 per output channel (symmetric: scale = max |w| / 127) and prepacked for
    `quantized::linear_dynamic`, cached on `module` and redone when the weight changes (like _packed_weight)."""
    try:
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    except RuntimeError:  # inference tensors have no version counter: key on the storage alone
        key = (weight.data_ptr(), None, tuple(weight.shape))
    cache = module.__dict__.setdefault("_int8_weights", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():
        w = weight.detach().float().contiguous()
        scales = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-12).double()
        with warnings.catch_warnings():  # torch 2.13 marks quantised tensors deprecated; they are what prepack takes
            warnings.simplefilter("ignore", UserWarning)
            quantised = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long), 0,
                                                   torch.qint8)
        packed = torch.ops.quantized.linear_prepack(quantised, None)
    cache[name] = (key, packed)
    return packed


def int8_linear(module: nn.Module, name: str, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b with W in int8 (cached on `module` under `name`) and x quantised per call, per row; float32 out.
    No autograd. The bias is added after the GEMM, so a bias built per call (the fused q/k/v one) does not defeat
    the cache."""
    packed = _int8_packed(module, name, weight)
    rows = x.reshape(-1, x.shape[-1]).float()
    count, width = rows.shape
    # linear_dynamic quantises its input with one range (min, max) per call. Each row is divided by its own max |x|
    # (the output rows multiplied back), and one extra row [1, -1, 0, ...] pins that range to [-1, 1]: one scale
    # per row, as CTranslate2 quantises, so Whisper's outlier rows do not flatten the others to a few levels, and a
    # row's result does not depend on which rows share its batch.
    row_scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)
    scaled = rows.new_empty((count + 1, width))
    torch.div(rows, row_scale, out=scaled[:count])
    scaled[count].zero_()
    scaled[count, :2] = torch.tensor([1.0, -1.0])[:width]
    out = torch.ops.quantized.linear_dynamic(scaled, packed, _reduce_range())[:count].mul_(row_scale)
    if bias is not None:
        out.add_(bias.float())
    return out.view(*x.shape[:-1], out.shape[-1])


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
    once the layer returns. For the encoder's large transients (qkv [T, 3d], MLP hidden [T, 4d])."""
    return scratch("encoder." + name, shape, like.dtype, like.device, _SCRATCH_MAX_BYTES)


def _add_layer_norm(x: Tensor, bias: Tensor | None, norm: "LayerNorm", out: Tensor | None = None) -> Tensor:
    """x += bias (in place; the residual stream's pending bias, if any), then norm(x) (no autograd): one pass with
    eureka_fast::add_layer_norm_ where it applies, else the add and the LayerNorm module. `out` (x's shape and
    dtype, contiguous): a buffer the compiled op may write the result into."""
    if (registry.cpu_kernel_runs("add_layer_norm_", x) and x.is_contiguous() and norm.weight is not None
            and norm.bias is not None and norm.weight.dtype == x.dtype and len(norm.normalized_shape) == 1):
        bias = None if bias is None else bias.to(x.dtype)
        return rowwise.add_layer_norm_(x, bias, norm.weight, norm.bias, norm.eps, out=out)
    if bias is not None:
        x.add_(bias)
    return norm(x)


def _linear_gelu(x: Tensor, weight: Tensor, bias: Tensor, out: Tensor | None = None) -> Tensor:
    """gelu(x W^T + b) for 2-D x (no autograd): the BLAS GEMM without its bias (a GEMM with one first copies it
    into every output row), then bias + GELU in one pass (eureka_fast::bias_gelu_), or GELU in place after a GEMM
    with the bias where that op is missing. (oneDNN's GELU-fused linear loses: its GEMM is slower than MKL's here.)"""
    if out is None:
        out = x.new_empty((x.shape[0], weight.shape[0]))
    if registry.cpu_kernel_runs("bias_gelu_", x):
        return rowwise.bias_gelu_(torch.mm(x, weight.t(), out=out), bias)
    return rowwise.gelu_(torch.addmm(bias, x, weight.t(), out=out))


# Weights above this size keep the BLAS path: the packed copy is a second copy of the weight, and its small gain
# does not pay for doubling the encoder's memory at the large widths (Whisper large's fc1 is 26 MB).
_PACK_MAX_BYTES = 16 << 20


def _packed_weight(module: nn.Module, name: str, weight: Tensor, x: Tensor, conv: bool = False) -> Tensor | None:
    """`weight` packed by eureka_fast::linear_pack for packed_linear_ (a conv weight [out, in, k] as the im2col
    matrix [out, k * in]), cached on `module` and repacked when the weight changes (another tensor, or an in-place
    update: data_ptr / _version). None where that kernel does not run (not float32, no AVX-512, no extension, a
    weight over _PACK_MAX_BYTES): the caller keeps the BLAS path. The cache costs one more copy of those weights."""
    if not registry.cpu_kernel_runs("packed_linear_", x) or x.dtype != torch.float32 or weight.dtype != torch.float32:
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
        packed = packed_linear.linear_pack(w.contiguous())
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
        # normed, attended: per-thread scratch too (fresh tensors of this size are page-faulted in on every call)
        normed_buf = _scratch("normed", (batch * length, d), x)
        normed = _add_layer_norm(flat, pending_bias, self.attn_norm, out=normed_buf)
        qkv = _scratch("qkv", (batch * length, 3 * d), x)
        packed = _packed_weight(self, "qkv", self.attn.qkv_weight, x)
        # [T, 3d] rows (attention copies its K / V heads once): head-major qkv costs the GEMM what attention saves
        if packed is not None:  # our GEMM on weights packed once (csrc/cpu/linear_avx512.cpp)
            packed_linear.packed_linear_(qkv, normed, packed, None, False, False)
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
        if (packed is not None and registry.cpu_kernel_runs("packed_linear_norm_", x) and norm.weight is not None
                and norm.bias is not None and len(norm.normalized_shape) == 1
                and all(t is None or t.dtype == x.dtype for t in (self.attn.out.bias, norm.weight, norm.bias))):
            # residual add, out-proj's bias and the MLP's LayerNorm in the GEMM's epilogue (the rows are normalised
            # while still in L1 where the weight fits one column block: no pass over the stream)
            normed = packed_linear.packed_linear_norm_(flat, attended, packed, self.attn.out.bias,
                                                               norm.weight, norm.bias, norm.eps, normed_buf)
        else:
            if packed is not None:  # residual add in the GEMM's epilogue (C += A W^T)
                packed_linear.packed_linear_(flat, attended, packed, None, True, False)
            else:
                flat.addmm_(attended, self.attn.out.weight.t())
            normed = _add_layer_norm(flat, self.attn.out.bias, norm, out=normed_buf)
        hidden = _scratch("hidden", (batch * length, self.fc1.out_features), x)
        packed = _packed_weight(self, "fc1", self.fc1.weight, x)
        if packed is not None and self.fc1.bias is not None and self.fc1.bias.dtype == x.dtype:
            # bias + exact GELU applied to the accumulators: no second pass over the [T, 4d] hidden
            packed_linear.packed_linear_(hidden, normed, packed, self.fc1.bias, False, True)
        else:
            hidden = _linear_gelu(normed, self.fc1.weight, self.fc1.bias, out=hidden)
        if not defer_bias:
            flat.add_(self.fc2.bias)
        packed = _packed_weight(self, "fc2", self.fc2.weight, x)
        if packed is not None:
            packed_linear.packed_linear_(flat, hidden, packed, None, True, False)
        else:
            flat.addmm_(hidden, self.fc2.weight.t())
        return x

    def _forward_int8(self, x: Tensor, key_lengths: Tensor | None) -> Tensor:
        """The layer with its four projections as dynamic int8 GEMMs (`int8_linear`); LayerNorms, attention (our
        kernel, masked by key_lengths) and GELU in float32. No autograd."""
        batch, length, d = x.shape
        n_head = self.attn.n_head
        qkv = int8_linear(self, "qkv", self.attn_norm(x), self.attn.qkv_weight)
        q, k, v = qkv.view(batch, length, 3, n_head, d // n_head).permute(2, 0, 3, 1, 4)
        attended = attention_op(q, k, v, key_lengths, q_bias=self.attn.q_bias, v_bias=self.attn.v_bias)
        attended = attended.transpose(1, 2).reshape(batch, length, d)
        x = x + int8_linear(self, "out", attended, self.attn.out.weight, self.attn.out.bias)
        hidden = int8_linear(self, "fc1", self.mlp_norm(x), self.fc1.weight)
        rowwise.bias_gelu_(hidden.view(-1, hidden.shape[-1]), self.fc1.bias.float())
        return x.add_(int8_linear(self, "fc2", hidden, self.fc2.weight, self.fc2.bias))


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
        if int8_enabled():
            for layer in self.layers:
                x = layer._forward_int8(x, out_lengths)
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
            packed_linear.packed_linear_(hidden[1:n + 1], im2col, w1, c1.bias, False, True)
            hidden[0].zero_()
            hidden[n + 1:].zero_()
            im2col = hidden.as_strided((out_frames, 3 * d), (2 * d, 1), hidden.storage_offset())
            packed_linear.packed_linear_(x[b], im2col, w2, c2.bias, False, True)
        return x
