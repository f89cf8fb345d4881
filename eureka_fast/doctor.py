"""`eureka-audio doctor`: what this installation holds, and whether its compiled kernels compute the right thing here.

Prints the build (torch, CUDA, the compiler, the CPU instruction set picked at run time), which kernels are compiled
and which path each op takes on each device present (the CUDA validation policy included), then runs every compiled
kernel on each device present against its reference over a small case matrix (float32 and bfloat16; T = 0, 1 and a
few hundred; skewed routing) and prints pass/fail with the largest error. Exit status: 0 when every check passes, 1
when one fails, 2 when the doctor cannot run. The first step after installing on a new machine.

On CUDA every compiled kernel is checked whatever the policy allows (that is how a kernel gets validated), and the
grouped-GEMM ops once per GEMM regime. References are the library's pure-PyTorch ones (eureka_fast.ops.reference)
or plain PyTorch, computed in float64 on the CPU from the same inputs.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

# Test-only: names of ops whose kernel output this harness perturbs before comparing (comma-separated), so the
# tests can check that a wrong kernel makes the doctor fail. Read by nothing but this module.
CORRUPT_ENV = "EUREKA_FAST_DOCTOR_CORRUPT"

MOE_OPS = ("route_topk", "moe_aux_loss", "moe_plan", "permute", "combine", "combine_backward", "grouped_mm",
           "grouped_mm_backward", "fused_experts", "stack_norm_project")
AUDIO_OPS = ("attention", "attention_out", "bias_gelu_", "add_layer_norm_", "add_layer_norm_out", "linear_pack",
             "packed_linear_", "packed_linear_norm_", "mel_power")
GEMM_OPS = ("grouped_mm", "grouped_mm_backward", "fused_experts")
GEMM_REGIMES = ("stream", "tiled", "wgmma", "simt")
T_VALUES = (0, 1, 300)


class Result(NamedTuple):
    device: str
    op: str
    variant: str
    case: str
    ok: bool
    err: float  # largest |kernel - reference| (0 for exact matches)
    tol: float
    note: str = ""


class Compare(NamedTuple):
    """One output to compare: exact (integers, copies) or within atol + rtol * max|reference|."""

    name: str
    got: object
    want: object
    exact: bool = False


def _tolerance(dtype) -> Tuple[float, float]:
    import torch

    # (atol, rtol): float32 kernels use ~1-ulp polynomial exp/erf and fp32 accumulation; bfloat16 outputs carry an
    # 8-bit mantissa and some paths round intermediates (the expert hidden) to bfloat16 as the model does.
    return {torch.float32: (1e-5, 2e-4), torch.bfloat16: (2e-3, 3e-2)}.get(dtype, (1e-5, 2e-4))


def _compare(items: Sequence[Compare], dtype, corrupt: bool) -> Tuple[bool, float, float, str]:
    import torch

    atol, rtol = _tolerance(dtype)
    worst_ratio, worst_err, worst_tol, note = 0.0, 0.0, 0.0, ""
    ok = True
    for i, c in enumerate(items):
        got = c.got
        if corrupt and i == 0 and isinstance(got, torch.Tensor) and got.numel():
            got = got.clone()
            flat = got.view(-1)
            flat[0] = flat[0] + (1 if not got.is_floating_point() else 1.0)
        want = c.want
        if isinstance(want, torch.Tensor):
            got_t = got.detach().to("cpu")
            want_t = want.detach().to("cpu")
            if tuple(got_t.shape) != tuple(want_t.shape):
                return False, math.inf, 0.0, f"{c.name}: shape {tuple(got_t.shape)}, reference {tuple(want_t.shape)}"
            if c.exact:
                same = torch.equal(got_t.to(torch.float64) if got_t.is_floating_point() else got_t.long(),
                                   want_t.to(torch.float64) if want_t.is_floating_point() else want_t.long())
                err = 0.0 if same else float((got_t.double() - want_t.double()).abs().max())
                tol = 0.0
            else:
                g, w = got_t.double(), want_t.double()
                if not bool(torch.isfinite(g).all()):
                    return False, math.inf, 0.0, f"{c.name}: non-finite values"
                err = float((g - w).abs().max()) if g.numel() else 0.0
                scale = float(w.abs().max()) if w.numel() else 0.0
                tol = atol + rtol * scale
        else:
            err, tol = abs(float(got) - float(want)), atol + rtol * abs(float(want))
        if err > tol:
            ok = False
            note = note or f"{c.name}: max err {err:.3g} > tol {tol:.3g}"
        ratio = err / tol if tol > 0 else (math.inf if err > 0 else 0.0)
        if ratio >= worst_ratio:
            worst_ratio, worst_err, worst_tol = ratio, err, tol
    return ok, worst_err, worst_tol, note


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------
E, K_TOP, H, I_DIM = 8, 2, 40, 24  # multiples of 8 where the CUDA vector paths need them


def _skewed_ids(T: int, gen):
    """[T, K_TOP] int32 expert ids, distinct within a row, most rows on the first few experts."""
    import torch

    if T == 0:
        return torch.zeros(0, K_TOP, dtype=torch.int32)
    p = torch.exp(-torch.arange(E, dtype=torch.float64) / 2.0).expand(T, E)
    return torch.multinomial(p, K_TOP, replacement=False, generator=gen).int()


def _rand(shape, gen, scale=1.0):
    import torch

    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _grad(t):
    """t's gradient, zeros where autograd left None (nothing flowed back: T = 0)."""
    import torch

    return t.grad if t.grad is not None else torch.zeros_like(t)


# ---------------------------------------------------------------------------------------------------------------
# Checks: each returns the comparisons for one (device, dtype, T) case
# ---------------------------------------------------------------------------------------------------------------
def _moe_checks(op: str, dev, dtype, T: int, gen) -> List[Compare]:
    import torch

    from .ops import reference as ref

    ops = torch.ops.eureka_fast
    on = lambda t: t.to(device=dev, dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    back = lambda t: t.to(dtype).double() if t.is_floating_point() else t  # noqa: E731  (the values the kernel saw)
    ids = _skewed_ids(T, gen)
    plan = ref.moe_plan(ids, E, 0)
    offsets, sorted_rows, inverse_rows = plan[1], plan[3], plan[4]
    weights = torch.rand(T, K_TOP, generator=gen, dtype=torch.float64).float()
    S = T * K_TOP

    if op == "route_topk":
        logits = _rand((T, E), gen)
        logits[:, :2] += 1.0  # skewed: the first experts win most rows
        bias = _rand((E,), gen, 0.1)
        out = []
        for scoring, renorm, b, n_group, topk_group, scaling in (("softmax", False, None, 1, 1, 1.0),
                                                                 ("sigmoid", True, bias, 2, 1, 2.5)):
            w, i = ops.route_topk(on(logits), K_TOP, scoring, renorm, None if b is None else on(b), n_group,
                                  topk_group, scaling)
            rw, ri = ref.route_topk(back(logits), K_TOP, scoring, renorm, None if b is None else back(b), n_group,
                                    topk_group, scaling)
            out += [Compare(f"{scoring} weights", w, rw), Compare(f"{scoring} ids", i, ri, exact=True)]
        return out
    if op == "moe_aux_loss":
        probs = torch.softmax(_rand((T, E), gen), -1)
        got = ops.moe_aux_loss(on(probs), ids.to(dev))
        return [Compare("loss", got, ref.moe_aux_loss(back(probs), ids))]
    if op == "moe_plan":
        got = ops.moe_plan(ids.to(dev), E, 4)
        want = ref.moe_plan(ids, E, 4)
        names = ("counts", "offsets", "padded_offsets", "sorted_rows", "inverse_rows")
        return [Compare(n, g, w, exact=True) for n, g, w in zip(names, got, want)]
    if op == "permute":
        x = _rand((T, H), gen)
        got = ops.permute(on(x), sorted_rows.to(dev), K_TOP)
        return [Compare("x_sorted", got, ref.permute(back(x), sorted_rows, K_TOP), exact=True)]
    if op == "combine":
        y = _rand((S, H), gen)
        got = ops.combine(on(y), inverse_rows.to(dev), weights.to(dev))
        return [Compare("out", got, ref.combine(back(y), inverse_rows, weights.double()))]
    if op == "combine_backward":
        y, g = _rand((S, H), gen), _rand((T, H), gen)
        gy, gw = ops.combine_backward(on(g), on(y), inverse_rows.to(dev), weights.to(dev))
        y64 = back(y).requires_grad_()
        w64 = weights.double().requires_grad_()
        want = ref.combine(y64, inverse_rows, w64)
        if want.requires_grad:
            want.backward(back(g))
        return [Compare("grad_y_sorted", gy, _grad(y64)), Compare("grad_weights", gw, _grad(w64))]
    if op in ("grouped_mm", "grouped_mm_backward"):
        out = []
        for act, n in (("none", H), ("silu_mul", 2 * I_DIM)):
            a, w = _rand((S, H), gen, 0.3), _rand((E, n, H), gen, 0.3)
            if op == "grouped_mm":
                got = ops.grouped_mm(on(a), on(w), offsets.to(dev), act)
                out.append(Compare(f"{act} out", got, ref.grouped_mm(back(a), back(w), offsets, act)))
            else:
                nout = n if act == "none" else n // 2
                g = _rand((S, nout), gen, 0.3)
                ga, gw = ops.grouped_mm_backward(on(g), on(a), on(w), offsets.to(dev), act)
                a64, w64 = back(a).requires_grad_(), back(w).requires_grad_()
                want = ref.grouped_mm(a64, w64, offsets, act)
                if want.requires_grad:  # S = 0: nothing to differentiate, the gradients are zero
                    want.backward(back(g))
                out += [Compare(f"{act} grad_a", ga, _grad(a64)), Compare(f"{act} grad_w", gw, _grad(w64))]
        return out
    if op == "fused_experts":
        x = _rand((T, H), gen, 0.5)
        w1, w2 = _rand((E, 2 * I_DIM, H), gen, 0.2), _rand((E, H, I_DIM), gen, 0.2)
        out = []
        for act in ("silu", "gelu"):
            got = ops.fused_experts(on(x), on(w1), on(w2), weights.to(dev), ids.to(dev), act)
            want = ref.fused_experts(back(x), back(w1), back(w2), weights.double(), ids, act)
            out.append(Compare(f"{act} out", got, want))
        return out
    if op == "stack_norm_project":
        B, D, k, hidden = 2, 16, 4, 24
        x = _rand((B, T, D), gen)
        lengths = torch.tensor([T, (T + 1) // 2], dtype=torch.int64)
        nw, nb = 1 + _rand((k * D,), gen, 0.1), _rand((k * D,), gen, 0.1)
        w1, b1 = _rand((hidden, k * D), gen, 0.2), _rand((hidden,), gen, 0.1)
        w2 = _rand((H, hidden), gen, 0.2)
        args = lambda f: (f(x), k, f(lengths), "layer", f(nw), f(nb), f(w1), f(b1), "silu", f(w2), None, 1e-5,  # noqa
                          "stack")
        got = ops.stack_norm_project(*args(on))
        return [Compare("out", got, ref.stack_norm_project(*args(back)))]
    raise KeyError(op)


def _audio_checks(op: str, dev, dtype, T: int, gen) -> Optional[List[Compare]]:
    """The Whisper encoder's and the log-mel front end's CPU kernels (float32). None: not applicable here."""
    import torch
    import torch.nn.functional as F

    ops = torch.ops.eureka_fast
    f32 = lambda t: t.to(device=dev, dtype=torch.float32)  # noqa: E731
    back = lambda t: t.float().double()  # noqa: E731
    rows = T
    if op in ("attention", "attention_out"):
        B, nh, dh, keys = 2, 2, 64, max(T, 1)
        q = _rand((B, nh, rows, dh), gen)
        k, v = _rand((B, nh, keys, dh), gen), _rand((B, nh, keys, dh), gen)
        lengths = torch.tensor([keys, max(1, keys // 2)], dtype=torch.int64)
        qb, vb = _rand((nh * dh,), gen, 0.1), _rand((nh * dh,), gen, 0.1)
        scale = 1 / math.sqrt(dh)
        if op == "attention":
            got = ops.attention(f32(q), f32(k), f32(v), lengths, scale, f32(qb), f32(vb))
        else:
            got = torch.empty(B, rows, nh, dh, device=dev)
            ops.attention_out(f32(q), f32(k), f32(v), lengths, scale, f32(qb), f32(vb), got)
        q64 = back(q) + back(qb).view(nh, 1, dh)
        v64 = back(v) + back(vb).view(nh, 1, dh)
        mask = torch.arange(keys).view(1, 1, 1, keys) < lengths.view(B, 1, 1, 1)
        want = F.scaled_dot_product_attention(q64, back(k), v64, attn_mask=mask, scale=scale).transpose(1, 2)
        return [Compare("out", got, want)]
    if op == "bias_gelu_":
        x, b = _rand((rows, 96), gen), _rand((96,), gen)
        got = ops.bias_gelu_(f32(x), f32(b))
        return [Compare("x", got, F.gelu(back(x) + back(b)))]
    if op in ("add_layer_norm_", "add_layer_norm_out"):
        d = 80
        x, b, w, lb = _rand((rows, d), gen), _rand((d,), gen, 0.1), 1 + _rand((d,), gen, 0.1), _rand((d,), gen, 0.1)
        xk = f32(x)
        if op == "add_layer_norm_":
            normed = ops.add_layer_norm_(xk, f32(b), f32(w), f32(lb), 1e-5)
        else:
            normed = torch.empty_like(xk)
            ops.add_layer_norm_out(xk, f32(b), f32(w), f32(lb), 1e-5, normed)
        summed = back(x) + back(b)
        want = F.layer_norm(summed, (d,), back(w), back(lb), 1e-5)
        return [Compare("normed", normed, want), Compare("x + bias", xk, summed)]
    if op in ("linear_pack", "packed_linear_", "packed_linear_norm_"):
        n_out, n_in = 96, 64
        w, b, x = _rand((n_out, n_in), gen, 0.2), _rand((n_out,), gen, 0.1), _rand((rows, n_in), gen)
        packed = ops.linear_pack(f32(w))
        if packed.numel() == 0:
            return None  # the packed GEMM does not run on this CPU (it keeps the BLAS path)
        if op == "linear_pack":
            out = torch.zeros(rows, n_out, device=dev)
            ops.packed_linear_(out, f32(x), packed, None, False, False)
            return [Compare("x W^T through the packing", out, back(x) @ back(w).t())]
        if op == "packed_linear_":
            out = f32(_rand((rows, n_out), gen))
            start = back(out.cpu())
            ops.packed_linear_(out, f32(x), packed, f32(b), True, True)
            return [Compare("out", out, F.gelu(start + back(x) @ back(w).t() + back(b)))]
        lw, lb = 1 + _rand((n_out,), gen, 0.1), _rand((n_out,), gen, 0.1)
        out = f32(_rand((rows, n_out), gen))
        start = back(out.cpu())
        normed = torch.empty_like(out)
        ops.packed_linear_norm_(out, f32(x), packed, f32(b), f32(lw), f32(lb), 1e-5, normed)
        summed = start + back(x) @ back(w).t() + back(b)
        return [Compare("normed", normed, F.layer_norm(summed, (n_out,), back(lw), back(lb), 1e-5)),
                Compare("out", out, summed)]
    if op == "mel_power":
        bins, n_mels = 201, 80
        spectrum = _rand((T, bins, 2), gen)
        filters = torch.rand(n_mels, bins, generator=gen, dtype=torch.float64) * (
            torch.rand(n_mels, bins, generator=gen) < 0.05)
        got = ops.mel_power(f32(spectrum), f32(filters), 1e-10)
        power = back(spectrum).pow(2).sum(-1)
        return [Compare("mel", got, (back(filters) @ power.t()).clamp_min(1e-10))]
    raise KeyError(op)


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------
@contextmanager
def _gemm_regime(regime: Optional[str]) -> Iterator[None]:
    """Forces one grouped-GEMM regime (with the SIMT fallback allowed where it does not apply) and restores the
    policy's mask and the environment afterwards."""
    from . import _C
    from .ops import cuda_policy

    saved = {k: os.environ.get(k) for k in ("EUREKA_FAST_GEMM", "EUREKA_FAST_WGMMA")}
    mask = cuda_policy.GEMM_REGIME_BITS
    previous = _C.set_cuda_gemm_regimes(sum(mask.values()) if regime is None else
                                        mask[f"gemm:{regime}"] | mask["gemm:simt"])
    try:
        if regime is None:
            os.environ.pop("EUREKA_FAST_GEMM", None)
        else:
            os.environ["EUREKA_FAST_GEMM"] = regime
            if regime == "wgmma":
                os.environ["EUREKA_FAST_WGMMA"] = "1"
        yield
    finally:
        _C.set_cuda_gemm_regimes(previous)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _has_kernel(op: str, key: str) -> bool:
    """Whether the build registered a kernel for ``op`` under dispatch key ``key`` ("CPU" | "CUDA")."""
    import torch

    from .ops import registry

    return registry.has_kernel(op, torch.device(key.lower()))


def run_checks(devices: Sequence[str], ops_filter: Optional[Sequence[str]] = None) -> List[Result]:
    import torch

    corrupt = {o.strip() for o in os.environ.get(CORRUPT_ENV, "").split(",") if o.strip()}
    results: List[Result] = []
    for device in devices:
        key = "CUDA" if device.startswith("cuda") else "CPU"
        dev = torch.device(device)
        for op in MOE_OPS + AUDIO_OPS:
            if ops_filter and op not in ops_filter:
                continue
            if not _has_kernel(op, key):
                continue
            is_moe = op in MOE_OPS
            dtypes = (torch.float32, torch.bfloat16) if is_moe and op != "moe_plan" else (torch.float32,)
            regimes: Sequence[Optional[str]] = (None,)
            if key == "CUDA" and op in GEMM_OPS:
                regimes = (None,) + GEMM_REGIMES
            for regime in regimes:
                for dtype in dtypes:
                    variant = str(dtype).replace("torch.", "") + ("" if regime is None else f" gemm:{regime}")
                    if op == "moe_plan":
                        variant = "int32 ids"
                    for T in T_VALUES:
                        gen = torch.Generator().manual_seed(1000 + T)
                        case = f"T={T}" + (" skewed" if is_moe else "")
                        try:
                            if key == "CUDA":
                                with _gemm_regime(regime):
                                    items = _moe_checks(op, dev, dtype, T, gen) if is_moe else \
                                        _audio_checks(op, dev, dtype, T, gen)
                                torch.cuda.synchronize()
                            else:
                                items = _moe_checks(op, dev, dtype, T, gen) if is_moe else \
                                    _audio_checks(op, dev, dtype, T, gen)
                        except Exception as exc:  # a kernel that raises on valid input fails its check
                            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                            results.append(Result(device, op, variant, case, False, math.inf, 0.0,
                                                  f"raised {type(exc).__name__}: {msg}"))
                            continue
                        if items is None:
                            results.append(Result(device, op, variant, case, True, 0.0, 0.0,
                                                  "not applicable on this CPU (the BLAS path runs)"))
                            continue
                        ok, err, tol, note = _compare(items, dtype, op in corrupt)
                        results.append(Result(device, op, variant, case, ok, err, tol, note))
    return results


def _summarise(results: Sequence[Result]) -> List[str]:
    lines = []
    groups: Dict[Tuple[str, str, str], List[Result]] = {}
    for r in results:
        groups.setdefault((r.device, r.op, r.variant), []).append(r)
    for (device, op, variant), rs in groups.items():
        ok = all(r.ok for r in rs)
        worst = max(rs, key=lambda r: (r.err / r.tol) if r.tol > 0 else (math.inf if r.err > 0 else 0.0))
        cases = ",".join(r.case.split()[0].split("=")[1] for r in rs)
        skew = " skewed" if any("skewed" in r.case for r in rs) else ""
        notes = sorted({r.note for r in rs if r.note and (not r.ok or "not applicable" in r.note)})
        detail = f"max err {worst.err:.2g} (tol {worst.tol:.2g})" if worst.tol > 0 or worst.err else "exact"
        if notes and all("not applicable" in n for n in notes):
            detail = notes[0]
        line = f"  {'PASS' if ok else 'FAIL'}  {device:<6} {op:<20} {variant:<22} T={cases}{skew:<8} {detail}"
        if not ok:
            failing = [r for r in rs if not r.ok]
            line += "  <- " + "; ".join(f"{r.case}: {r.note}" for r in failing)
        lines.append(line)
    return lines


def _build_lines() -> Tuple[List[str], bool]:
    import platform

    import torch

    from . import ops
    from .ops import cuda_policy

    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), Python {platform.python_version()}, "
             f"{platform.machine()}"]
    loaded = ops.backend() == "compiled"
    if not loaded:
        lines.append("eureka_fast._C: NOT BUILT (every op runs its pure-PyTorch reference)")
        return lines, False
    from . import _C

    info = dict(_C.build_info()) if hasattr(_C, "build_info") else {}
    cap = os.environ.get("EUREKA_FAST_CPU_ISA")
    lines.append(f"eureka_fast._C: {getattr(_C, '__file__', '?')}")
    lines.append(f"  compiler {info.get('compiler', '?')}, C++ {info.get('cplusplus', '?')}, "
                 f"{'optimised' if info.get('optimized') else 'NOT optimised'}, OpenMP {info.get('openmp', 0) or 'off'}"
                 f"{', AddressSanitizer' if info.get('asan') else ''}")
    lines.append(f"  CPU instruction set picked at run time: {info.get('cpu_isa', '?')}"
                 f"{f' (capped by EUREKA_FAST_CPU_ISA={cap})' if cap else ''}")
    if info.get("with_cuda"):
        lines.append(f"  CUDA kernels: compiled (CUDA {info.get('cuda_compiled_version')}, nvcc "
                     f"{info.get('nvcc_version')})")
    else:
        lines.append("  CUDA kernels: absent (this build has CPU kernels only)")
    setting = cuda_policy.active_setting()
    validated = [n for n, p in cuda_policy.KERNEL_PATHS.items() if p.validated is not None]
    lines.append(f"CUDA kernel policy: {cuda_policy.ENV_VAR}={setting.text!r} -> {setting.mode}; validated on "
                 f"hardware: {', '.join(validated) if validated else 'none yet'}")
    return lines, True


def _kernel_table() -> List[str]:
    lines = [f"  {'op':<20} CPU  CUDA"]
    for op in MOE_OPS + AUDIO_OPS:
        lines.append(f"  {op:<20} {'yes' if _has_kernel(op, 'CPU') else '-':<4} "
                     f"{'yes' if _has_kernel(op, 'CUDA') else '-'}")
    return lines


def main(argv: Optional[Sequence[str]] = None, *, ops_filter: Optional[Sequence[str]] = None,
         device: Optional[str] = None) -> int:
    start = time.time()
    import torch

    from .ops import cuda_policy

    lines, loaded = _build_lines()
    print("eureka-audio doctor")
    print("\n".join(lines))
    if not loaded:
        print("no compiled kernels to check; build the extension (docs/install.md)")
        return 1
    unknown = sorted(set(ops_filter or ()) - set(MOE_OPS + AUDIO_OPS))
    if unknown:
        raise ValueError(f"--ops: unknown op(s) {unknown}; choose from {', '.join(MOE_OPS + AUDIO_OPS)}")
    cuda_present = torch.cuda.is_available()
    devices = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda_present else [])
    if device is not None:
        if device not in devices:
            raise ValueError(f"--device {device!r} is not present here; present: {', '.join(devices)}")
        devices = [device]
    if cuda_present:
        for d in devices[1:]:
            p = torch.cuda.get_device_properties(d)
            print(f"device {d}: {p.name}, compute capability {p.major}.{p.minor}")
    else:
        print("no CUDA device present")
    print("compiled kernels:")
    print("\n".join(_kernel_table()))
    for d in devices:
        print(f"path each op takes on {d}:")
        for op, (path, why) in cuda_policy.backend_report(d).items():
            print(f"  {op:<20} {path:<9} {why}")
    print("checks (kernel vs reference, float64 on the CPU):")
    results = run_checks(devices, ops_filter)
    print("\n".join(_summarise(results)))
    failed = [r for r in results if not r.ok]
    print(f"{len(results)} checks, {len(failed)} failed ({time.time() - start:.1f} s)")
    return 1 if failed else 0


def _run(args: argparse.Namespace) -> int:
    try:
        return main(ops_filter=args.ops.split(",") if args.ops else None, device=args.device)
    except Exception as exc:  # one line, no traceback
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"eureka-audio doctor: error: {msg}", file=sys.stderr)
        return 2


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="check the build: what is compiled, which path each op takes, and "
                                             "every compiled kernel against its reference on each device present")
    p.add_argument("--ops", default=None, help="comma-separated ops to check (default: every compiled kernel)")
    p.add_argument("--device", default=None, help="check one device only (cpu, cuda:0, ...)")
    p.set_defaults(func=_run)
