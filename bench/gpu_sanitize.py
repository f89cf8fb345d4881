"""Small calls of every CUDA op and every grouped-GEMM kernel path, for compute-sanitizer memcheck.

Run as: PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/gpu_sanitize.py
(without the caching allocator every tensor is its own allocation, so an out-of-bounds access is seen).
Shapes include partial tiles, zero-token experts, tail rows, k = E and T = 0 / 1.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from eureka_fast import _C  # noqa: E402,F401

ops = torch.ops.eureka_fast
dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)
calls = 0


def rnd(*shape, dtype=torch.bfloat16, scale=0.5):
    return (torch.randn(*shape, device=dev, generator=g) * scale).to(dtype)


def run(fn, *args):
    global calls
    out = fn(*args)
    torch.cuda.synchronize()
    calls += 1
    return out


# routing
for T, E, k in [(0, 8, 2), (1, 8, 8), (37, 64, 8), (5, 256, 8)]:
    logits = rnd(T, E, dtype=torch.float32, scale=1.0)
    run(ops.route_topk, logits, k, "softmax", True, None, 1, 1, 1.0)
    bias = rnd(E, dtype=torch.float32, scale=0.1)
    ng = 8 if E % 8 == 0 and E >= 64 else 1
    run(ops.route_topk, logits.bfloat16(), k, "sigmoid", True, bias, ng, 4 if ng > 1 else 1, 2.5)
    if T:
        w, ids = ops.route_topk(logits, k, "softmax", False, None, 1, 1, 1.0)
        run(ops.moe_aux_loss, torch.softmax(logits, -1), ids)

# plan (small and large paths), permute, combine (+ backward)
for T, E, k in [(0, 4, 2), (1, 8, 2), (33, 8, 8), (3000, 128, 8)]:
    ids = torch.argsort(torch.rand(T, E, device=dev, generator=g), 1)[:, :k].int()
    for block in (0, 64):
        counts, offs, padded, srt, inv = run(ops.moe_plan, ids, E, block)
    for H, dt in [(64, torch.bfloat16), (37, torch.float32), (2048, torch.float16)]:
        x = rnd(T, H, dtype=dt)
        xs = run(ops.permute, x, srt, k)
        w = torch.rand(T, k, device=dev, generator=g)
        run(ops.combine, xs, inv, w)
        run(ops.combine_backward, rnd(T, H, dtype=dt), torch.cat([xs, rnd(3, H, dtype=dt)]), inv, w)

# grouped GEMM on every path, forward and backward
shapes = [([3, 0, 5, 1], 64, 96, 2), ([0, 40, 0], 128, 256, 0), ([1] * 8, 256, 512, 0), ([70, 130, 1], 72, 136, 1),
          ([5, 9], 20, 30, 3)]
for path in ("stream", "tiled", "wgmma", "simt", ""):
    os.environ["EUREKA_FAST_GEMM"] = path
    for counts, K, N, tail in shapes:
        E = len(counts)
        offs = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(counts).cumsum(0)]).to(dev)
        S = int(sum(counts)) + tail
        for dt in (torch.bfloat16, torch.float32):
            a = rnd(S, K, dtype=dt)
            w = rnd(E, N, K, dtype=dt, scale=K ** -0.5)
            for act in ("none", "silu_mul"):
                run(ops.grouped_mm, a, w, offs, act)
                n_out = N if act == "none" else N // 2
                run(ops.grouped_mm_backward, rnd(S, n_out, dtype=dt), a, w, offs, act)
            run(ops.grouped_mm, a, w.transpose(1, 2).contiguous().transpose(1, 2), offs, "gelu_mul")
    for T, H, I, E, k in [(1, 256, 128, 16, 4), (33, 72, 40, 8, 8), (300, 128, 64, 8, 2), (9, 100, 30, 4, 2)]:
        x = rnd(T, H)
        ids = torch.argsort(torch.rand(T, E, device=dev, generator=g), 1)[:, :k].int()
        w = torch.rand(T, k, device=dev, generator=g)
        run(ops.fused_experts, x, rnd(E, 2 * I, H, scale=H ** -0.5), rnd(E, H, I, scale=I ** -0.5), w, ids, "silu")
os.environ.pop("EUREKA_FAST_GEMM", None)

# audio downsampling
for T in (1, 37):
    x = rnd(2, T, 48)
    lengths = torch.tensor([T, max(1, T // 3)], device=dev)
    run(ops.stack_norm_project, x, 4, lengths, "layer", torch.ones(192, device=dev), torch.zeros(192, device=dev),
        rnd(64, 192), rnd(64), "silu", rnd(64, 64), rnd(64), 1e-5, "stack")
    run(ops.stack_norm_project, x, 2, None, "rms", torch.ones(48, device=dev), None, rnd(64, 48), None, "swiglu",
        None, None, 1e-5, "mean")

print(f"gpu_sanitize: {calls} op calls completed")
