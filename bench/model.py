"""Whole-model throughput of Eureka-Audio: prefill and decode tokens/s, fast ops vs reference ops, in one run.

    python bench/model.py                 # tiny preset + eureka-1.7b dims with 2 encoder / 2 LLM layers
    python bench/model.py --quick         # tiny only, fewer repeats
    python bench/model.py --device cuda --dtype bfloat16

Prefill: one forward over a prompt holding `--audio-seconds` of audio (Whisper encoder on the 30 s window(s),
MoE adapter, LLM) + the ASR prompt text; tokens/s counts every prompt token (text + audio). The adapter alone is timed
too, since it is the only part that runs on the eureka_fast ops. Decode: `--decode-tokens` greedy steps with the KV
cache after that prefill (audio enters only at prefill, so decode does not touch the adapter ops).
"fast" = eureka_fast.ops with the compiled kernels when they are built (``ops.backend()`` is printed: when it says
"reference" both columns run the same code); "reference" = ``use_reference=True`` everywhere.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(name: str, device, dtype):
    from eureka_fast.models import EurekaAudioConfig, EurekaAudioForCausalLM, EurekaAudioProcessor

    if name == "tiny":
        config = EurekaAudioConfig.preset("tiny")
    elif name == "eureka-1.7b-2L":
        # the real widths (Whisper-large-v3 encoder, Qwen3-1.7B LLM, default adapter) with 2 layers each
        config = EurekaAudioConfig.preset("eureka-1.7b", audio_config={"n_audio_layer": 2},
                                          text_config={"num_hidden_layers": 2})
    else:
        raise ValueError(name)
    torch.manual_seed(0)
    model = EurekaAudioForCausalLM(config).to(device=device, dtype=dtype).eval()
    processor = EurekaAudioProcessor.preset("tiny")
    return model, processor


def prompt_inputs(model, processor, seconds: float, device, dtype):
    """ASR prompt with `seconds` of audio; for configs other than tiny, ids are remapped onto the model's audio ids
    (the tiny tokenizer stands in for the Qwen tokenizer: only the token count matters here)."""
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
    conv = [{"role": "system", "content": "You are an advanced ASR (Automatic Speech Recognition) AI assistant."},
            {"role": "user", "content": [{"type": "audio", "audio": audio}]}]
    inputs = processor(conv)
    cfg = model.config
    ids = inputs["input_ids"]
    remap = {processor.audio_pad_token_id: cfg.audio_pad_token_id,
             processor.audio_start_token_id: cfg.audio_start_token_id,
             processor.audio_end_token_id: cfg.audio_end_token_id}
    for src, dst in remap.items():
        ids = torch.where(inputs["input_ids"] == src, dst, ids)
    inputs["input_ids"] = ids
    if cfg.audio_config.n_mels != processor.n_mels:  # same token layout, features of the model's mel size
        from eureka_fast.audio import log_mel

        inputs["input_features"] = log_mel(audio, cfg.audio_config.n_mels, mode="eureka").windows
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["input_features"] = inputs["input_features"].to(dtype)
    return inputs


def bench_config(name, args, device, dtype):
    model, processor = build(name, device, dtype)
    inputs = prompt_inputs(model, processor, args.audio_seconds, device, dtype)
    n_prompt = int(inputs["input_ids"].shape[1])
    n_audio = int((inputs["token_type_ids"] == 3).sum())
    # adapter input: the encoder frames of the prompt's window(s), computed once
    with torch.no_grad():
        frames = model.audio_encoder(inputs["input_features"])
    n_decode = args.decode_tokens

    def adapter_only():
        fused = model.adapter.fuse(frames)
        model.adapter.mix(fused.reshape(-1, fused.shape[-1])[:n_audio])

    def prefill():
        return model(**inputs, use_cache=True)

    def decode():
        out = model(**inputs, use_cache=True)
        cache = out.cache
        token = out.logits[:, -1:].argmax(-1)
        mask = inputs["attention_mask"]
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n_decode):
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
            step = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
            cache = step.cache
            token = step.logits[:, -1:].argmax(-1)
        _sync(device)
        return time.perf_counter() - t0

    # The two modes alternate inside every repeat, so load drifts on a shared machine hit both alike.
    samples = {mode: dict(adapter=[], prefill=[], decode=[]) for mode in ("fast", "reference")}
    with torch.no_grad():
        for mode in ("fast", "reference"):  # warm-up
            model.set_reference_ops(mode == "reference")
            adapter_only()
            prefill()
        for _ in range(args.repeats):
            for mode in ("fast", "reference"):
                model.set_reference_ops(mode == "reference")
                samples[mode]["adapter"].append(_timed(adapter_only, device, 1))
                samples[mode]["prefill"].append(_timed(prefill, device, 1))
                samples[mode]["decode"].append(decode())
    rows = {}
    for mode, s in samples.items():
        t_adapter, t_prefill, t_decode = (statistics.median(s[k]) for k in ("adapter", "prefill", "decode"))
        rows[mode] = dict(adapter_ms=1e3 * t_adapter, prefill_ms=1e3 * t_prefill,
                          prefill_tok_s=n_prompt / t_prefill, decode_tok_s=n_decode / t_decode)
    model.set_reference_ops(False)
    ratio = {k: rows["reference"][k] / rows["fast"][k] for k in ("adapter_ms", "prefill_ms")}
    ratio.update({k: rows["fast"][k] / rows["reference"][k] for k in ("prefill_tok_s", "decode_tok_s")})
    params = sum(p.numel() for p in model.parameters())
    del model
    return dict(config=name, params_m=params / 1e6, prompt_tokens=n_prompt, audio_tokens=n_audio, fast=rows["fast"],
                reference=rows["reference"], speedup=ratio)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "eureka-1.7b-2L"])
    parser.add_argument("--quick", action="store_true", help="tiny only, 2 repeats, 8 decode tokens")
    parser.add_argument("--audio-seconds", type=float, default=10.0)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.repeats, args.decode_tokens = ["tiny"], 2, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    from eureka_fast import ops

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    header = (f"eureka_fast model bench: ops backend={ops.backend()}, device={device}"
              f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, dtype={args.dtype}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
              f"{args.audio_seconds:g} s audio, {args.decode_tokens} decode tokens, median of {args.repeats}")
    print(header)
    results = [bench_config(name, args, device, dtype) for name in args.configs]
    print()
    print("| config | params (M) | prompt tok (audio) | ops | adapter ms | prefill ms | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for mode in ("fast", "reference"):
            m = r[mode]
            print(f"| {r['config']} | {r['params_m']:.1f} | {r['prompt_tokens']} ({r['audio_tokens']}) | {mode} | "
                  f"{m['adapter_ms']:.2f} | {m['prefill_ms']:.1f} | {m['prefill_tok_s']:.0f} | {m['decode_tok_s']:.1f} |")
        s = r["speedup"]
        print(f"| {r['config']} | | | fast / reference | x{s['adapter_ms']:.2f} | x{s['prefill_ms']:.2f} | "
              f"x{s['prefill_tok_s']:.2f} | x{s['decode_tok_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(header=header, results=results), fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
