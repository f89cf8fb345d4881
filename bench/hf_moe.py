"""transformers MoE models on CPU: eager experts vs grouped_mm vs eureka_fast, forward and forward+backward.

Every implementation runs on a deep copy of the same randomly initialised model (no downloads), at 512 tokens
(batch x sequence), and the timings are interleaved (one run of each implementation per round, best of the rounds)
so that load from other processes hits all of them alike. Ratios are speed-ups over transformers' eager experts.

Implementations:
  eager        transformers' per-expert Python loop (experts_implementation="eager")
  grouped_mm   transformers' sort + torch grouped GEMM (experts_implementation="grouped_mm", the default)
  ef_experts   experts_implementation="eureka_fast": experts through eureka_fast.ops.fused_experts, routers unchanged
  ef_full      eureka_fast.apply_fast_moe(model): routers through route_topk and experts through fused_experts

Two scopes: "block" times one MoE block (router + experts) on a [batch, seq, H] tensor, "model" the whole causal
LM (attention, norms and LM head included, so its ratios are diluted by the non-MoE work).

    python bench/hf_moe.py                # all sizes, 5 rounds
    python bench/hf_moe.py --quick        # the tiny sizes only, 3 rounds
    python bench/hf_moe.py --json out.json
    python bench/hf_moe.py --dtype bf16   # the model and its inputs in bf16 (how transformers models usually run)
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import time

import torch

IMPLEMENTATIONS = ("eager", "grouped_mm", "ef_experts", "ef_full")

# (name, family, hidden, moe intermediate, experts, top-k, layers). Qwen3-30B-A3B is H=2048, I=768, E=128, k=8 and
# OLMoE-1B-7B is H=2048, I=1024, E=64, k=8: the "small" sizes keep their expert counts and top-k at a fraction of the
# width, so rows per expert (512 * k / E = 32 and 64) are those of the real models at 512 tokens.
SIZES = [
    ("qwen3_moe-tiny", "qwen3_moe", 128, 64, 16, 2, 2),
    ("olmoe-tiny", "olmoe", 128, 64, 16, 2, 2),
    ("qwen3_moe-small", "qwen3_moe", 512, 192, 128, 8, 2),
    ("olmoe-small", "olmoe", 512, 256, 64, 8, 2),
]


def build_model(family: str, hidden: int, inter: int, experts: int, top_k: int, layers: int):
    import transformers as tf

    common = dict(vocab_size=1024, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=1024, num_experts=experts,
                  num_experts_per_tok=top_k, tie_word_embeddings=False)
    if family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, head_dim=hidden // 8, intermediate_size=4 * inter,
                                moe_intermediate_size=inter, norm_topk_prob=True)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**common, intermediate_size=inter, norm_topk_prob=False)
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def variants(model):
    import eureka_fast
    from eureka_fast.integrations.transformers import EXPERTS_IMPLEMENTATION

    out = {}
    for impl in IMPLEMENTATIONS:
        m = copy.deepcopy(model)
        if impl == "eager":
            m.set_experts_implementation("eager")
        elif impl == "grouped_mm":
            m.set_experts_implementation("grouped_mm")
        elif impl == "ef_experts":
            m.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        else:
            m.set_experts_implementation("eager")  # irrelevant once every experts module is patched
            report = eureka_fast.apply_fast_moe(m)
            assert not report.untouched, str(report)
        out[impl] = m
    return out


def _moe_block(model):
    return next(m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate"))


def make_step(model, scope: str, mode: str, tokens: torch.Tensor, hidden: torch.Tensor):
    if scope == "block":
        block = _moe_block(model)

        def step():
            if mode == "fwd":
                with torch.no_grad():
                    block(hidden)
            else:
                h = hidden.detach().requires_grad_(True)
                block(h).float().pow(2).mean().backward()
    else:
        def step():
            if mode == "fwd":
                with torch.no_grad():
                    model(tokens)
            else:
                model(tokens, labels=tokens).loss.backward()
    return step


def check_outputs(models, hidden):
    """Max |block output - eager block output| per implementation (all must agree before timing means anything)."""
    with torch.no_grad():
        ref = _moe_block(models["eager"])(hidden)
        return {impl: (_moe_block(m)(hidden) - ref).abs().max().item() for impl, m in models.items()}


def bench_size(name, family, hidden_size, inter, experts, top_k, layers, *, batch, seq, rounds, timer,
               budget_s=10.0, dtype=torch.float32):
    model = build_model(family, hidden_size, inter, experts, top_k, layers).to(dtype)
    models = variants(model)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    hidden = torch.randn(batch, seq, hidden_size, generator=g).to(dtype)
    max_err = check_outputs(models, hidden)
    rows = []
    for scope in ("block", "model"):
        for mode in ("fwd", "fwd+bwd"):
            steps = {impl: make_step(m, scope, mode, tokens, hidden) for impl, m in models.items()}
            for step in steps.values():  # warm-up: allocator, oneDNN primitive caches, lazy imports
                step()
            best = {impl: float("inf") for impl in steps}
            spent = {impl: 0.0 for impl in steps}
            for r in range(rounds):
                for impl, step in steps.items():
                    # Eager experts' backward takes seconds (each expert's weight slice gets a full-size gradient);
                    # two samples of a step that slow are plenty and keep the whole run short.
                    if r >= 2 and spent[impl] > budget_s:
                        continue
                    for m in models.values():
                        m.zero_grad(set_to_none=True)
                    t0 = timer()
                    step()
                    elapsed = timer() - t0
                    spent[impl] += elapsed
                    best[impl] = min(best[impl], elapsed)
            rows.append(dict(size=name, scope=scope, mode=mode, ms={k: v * 1e3 for k, v in best.items()},
                             speedup_vs_eager={k: best["eager"] / v for k, v in best.items()}))
    return dict(size=name, family=family, hidden=hidden_size, moe_intermediate=inter, experts=experts, top_k=top_k,
                layers=layers, tokens=batch * seq, rows_per_expert=batch * seq * top_k / experts,
                max_abs_diff_vs_eager=max_err, results=rows)


def environment():
    import transformers

    import eureka_fast

    try:
        commit = subprocess.run(["git", "log", "-1", "--format=%h %s", "--", "eureka_fast/ops", "csrc"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - informational only
        commit = "?"
    return dict(torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine(), ops_backend=eureka_fast.ops.backend(),
                fused_experts_compiled=_fused_experts_compiled(), last_ops_commit=commit)


def _fused_experts_compiled() -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("eureka_fast::fused_experts", "CPU"))
    except RuntimeError:
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes only, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (best of); default 5 (3 with --quick)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--sizes", nargs="*", default=None, help="subset of: " + " ".join(s[0] for s in SIZES))
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter; cpu: process CPU time of all threads (steadier on a loaded machine, "
                             "but counts spinning intra-op threads)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's). On a shared machine, --threads 1 --timer cpu "
                             "measures the work itself: waiting for the CPU is not counted")
    parser.add_argument("--json", default=None, help="write all numbers here")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="model and input dtype")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rounds = args.rounds or (3 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [s for s in SIZES if (args.sizes is None or s[0] in args.sizes) and (not args.quick or "tiny" in s[0])]
    env = environment()
    print("environment:", ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{args.batch} x {args.seq} = {args.batch * args.seq} tokens, {args.dtype}, best of {rounds} interleaved "
          f"rounds, {args.timer} time")
    all_results = []
    for size in sizes:
        res = bench_size(*size, batch=args.batch, seq=args.seq, rounds=rounds,
                         timer=time.perf_counter if args.timer == "wall" else time.process_time, dtype=dtype)
        all_results.append(res)
        print(f"\n{res['size']}: H={res['hidden']} I={res['moe_intermediate']} E={res['experts']} k={res['top_k']} "
              f"layers={res['layers']}, {res['rows_per_expert']:.0f} rows/expert; max |out - eager| "
              + ", ".join(f"{k}={v:.1e}" for k, v in res["max_abs_diff_vs_eager"].items()))
        print(f"  {'scope':6s} {'mode':8s} " + " ".join(f"{impl:>22s}" for impl in IMPLEMENTATIONS))
        for row in res["results"]:
            cells = [f"{row['ms'][i]:9.2f} ms ({row['speedup_vs_eager'][i]:4.2f}x)" for i in IMPLEMENTATIONS]
            print(f"  {row['scope']:6s} {row['mode']:8s} " + " ".join(f"{c:>22s}" for c in cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, batch=args.batch, seq=args.seq, rounds=rounds, timer=args.timer,
                           dtype=args.dtype, sizes=all_results), f,
                      indent=1)
    return all_results


if __name__ == "__main__":
    main()
