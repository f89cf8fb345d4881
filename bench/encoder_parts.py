"""Per-part CPU time of the Whisper encoder's inference path, one 30 s window, 1 thread.

    python bench/encoder_parts.py [--size tiny|base] [--rounds N]

Each part is timed on its own (CPU time of this thread, best of interleaved rounds) with the shapes and the calls
the encoder's in-place inference path makes; "per layer" parts are for one layer.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from eureka_fast.models.whisper.encoder import (WhisperDims, WhisperEncoder, _linear_gelu,  # noqa: E402
                                                _packed_weight, encoder_flops)
from eureka_fast.ops.attention import attention as attention_op  # noqa: E402


def best(contenders: dict, rounds: int) -> dict:
    out = {k: float("inf") for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            fn()
            t0 = time.thread_time()
            fn()
            out[name] = min(out[name], (time.thread_time() - t0) * 1e3)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="tiny")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    dims = WhisperDims.preset(args.size)
    d, H, T = dims.n_audio_state, dims.n_audio_head, 1500
    torch.manual_seed(0)
    enc = WhisperEncoder(dims).eval()
    layer = enc.layers[0]
    mel = torch.randn(1, dims.n_mels, 3000)
    x = torch.randn(1, T, d)
    flat = x.view(T, d)
    q, k, v = layer.attn.project_qkv(layer.attn_norm(x))
    att = attention_op(q, k, v).transpose(1, 2).reshape(T, d).contiguous()
    hidden = torch.randn(T, 4 * d)
    qh, kh, vh = torch.stack([q, k, v]).contiguous().unbind(0)
    with torch.inference_mode():
        parts = {
            "encoder (whole)": lambda: enc(mel),
            "conv stem": lambda: F.gelu(enc.conv2(F.gelu(enc.conv1(mel)))).transpose(1, 2).contiguous(),
            "layernorm x2": lambda: (layer.attn_norm(x), layer.mlp_norm(flat)),
            "qkv linear": lambda: F.linear(flat, layer.attn.qkv_weight, layer.attn.qkv_bias()),
            "attention": lambda: attention_op(q, k, v),
            # dense [T, 64] heads (read in place, no K / V copies), as a head-major qkv would give them
            "attention (dense heads)": lambda: attention_op(qh, kh, vh, q_bias=layer.attn.q_bias,
                                                           v_bias=layer.attn.v_bias),
            "out addmm": lambda: flat.clone().addmm_(att, layer.attn.out.weight.t()),
            "fc1 + gelu": lambda: _linear_gelu(flat, layer.fc1.weight, layer.fc1.bias),
            "fc2 addmm": lambda: flat.clone().addmm_(hidden, layer.fc2.weight.t()),
            "clone (subtract)": lambda: flat.clone(),
        }
        # the packed-weight GEMM (csrc/cpu/linear_avx512.cpp) the inference path uses where linear_pack runs
        packed = {name: _packed_weight(layer, name, w, x) for name, w in
                  (("qkv", layer.attn.qkv_weight), ("out", layer.attn.out.weight), ("fc1", layer.fc1.weight),
                   ("fc2", layer.fc2.weight))}
        if all(packed[name] is not None for name in ("qkv", "out", "fc1")):  # base's fc2 (K = 2048) keeps MKL
            linear = torch.ops.eureka_fast.packed_linear_
            qkv_out, hidden_out, normed_out = torch.empty(T, 3 * d), torch.empty(T, 4 * d), torch.empty(T, d)
            pos = enc.positional_embedding
            parts.update({
                "conv stem (ours)": lambda: enc._packed_stem(mel, None),
                "conv stem (old)+pos": lambda: (F.gelu(enc.conv2(F.gelu(enc.conv1(mel)))).transpose(1, 2)
                                                .contiguous().add_(pos)),
                "conv stem (ours)+pos": lambda: enc._packed_stem(mel, None).add_(pos),
                "qkv (ours)": lambda: linear(qkv_out, flat, packed["qkv"], None, False, False),
                "out += (ours)": lambda: linear(flat.clone(), att, packed["out"], None, True, False),
                "out += + LN (ours)": lambda: torch.ops.eureka_fast.packed_linear_norm_(
                    flat.clone(), att, packed["out"], layer.attn.out.bias, layer.mlp_norm.weight, layer.mlp_norm.bias,
                    layer.mlp_norm.eps, normed_out),
                "fc1 + gelu (ours)": lambda: linear(hidden_out, flat, packed["fc1"], layer.fc1.bias, False, True),
            })
            if packed["fc2"] is not None:
                parts["fc2 += (ours)"] = lambda: linear(flat.clone(), hidden, packed["fc2"], None, True, False)
        times = best(parts, args.rounds)
    for name, ms in times.items():
        print("%-18s %8.2f ms" % (name, ms))
    flops = encoder_flops(dims)
    print("encoder FLOPs %.1f G; attention FLOP per layer %.2f G" % (flops / 1e9, 4 * T * T * d / 1e9))


if __name__ == "__main__":
    main()
