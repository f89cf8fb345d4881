"""One-thread CPU time (or, with --threads N > 1, wall time) of fused_experts on the given shapes (inputs as in
bench/moe.py, seed 0): best of --calls per shape, printed as one JSON line. Used to compare two builds (PYTHONPATH
picks the build) in alternating processes on a shared machine:

    for i in 1 2 3; do for p in ../tree-a ../tree-b; do PYTHONPATH=$p python bench/fused_cpu_time.py; done; done
"""
import argparse
import json
import math
import time

import torch

import eureka_fast  # noqa: E402
from eureka_fast import ops  # noqa: E402

SHAPES = "1024,1024,512,64,8;4096,1024,512,64,8;1500,2048,1280,8,4;375,2048,1280,8,4"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="> 1: wall time instead of thread CPU time")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: activations, weights and routing weights in bf16 (a transformers bf16 model)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    result = {"build": eureka_fast.__file__.rsplit("/eureka_fast/", 1)[0], "dtype": args.dtype}
    for spec in args.shapes.split(";"):
        T, H, I, E, k = (int(v) for v in spec.split(","))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(T, H, generator=gen)
        w_gate_up = torch.randn(E, 2 * I, H, generator=gen) / math.sqrt(H)
        w_down = torch.randn(E, H, I, generator=gen) / math.sqrt(I)
        logits = torch.randn(T, E, generator=gen)
        weights, ids = ops.route_topk(logits, k, renormalize=True)
        x, w_gate_up, w_down, weights = (t.to(dtype) for t in (x, w_gate_up, w_down, weights))
        with torch.inference_mode():
            ops.fused_experts(x, w_gate_up, w_down, weights, ids)
            best = math.inf
            for _ in range(args.calls):
                t0 = clock()
                ops.fused_experts(x, w_gate_up, w_down, weights, ids)
                best = min(best, clock() - t0)
        result[spec] = {"ms": best * 1e3, "gflops": 2.0 * T * k * 3 * H * I / best * 1e-9}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
