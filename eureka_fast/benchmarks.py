"""Benchmark tables for the op library: `eureka-audio bench` (quick sizes) and bench/moe.py, bench/downsample.py
(full sizes, recorded in bench/RESULTS.md).

Every table measures its baselines and its roofline in the same run, interleaved with our op (round-robin over the
methods, best of several repeats), so ratios stay meaningful on a noisy, shared machine.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# (T, H, I, E, k): the Eureka adapter at 4 x 30 s clips and at one clip, then Qwen-style many-expert shapes from
# decode (T=1) to prefill.
MOE_SHAPES: List[Tuple[int, int, int, int, int]] = [
    (1500, 2048, 1280, 8, 4),
    (375, 2048, 1280, 8, 4),
    (1, 1024, 512, 64, 8),
    (64, 1024, 512, 64, 8),
    (1024, 1024, 512, 64, 8),
    (4096, 1024, 512, 64, 8),
]
# Same regimes at a quarter of the widths (and fewer tokens) for `eureka-audio bench`.
MOE_SHAPES_QUICK: List[Tuple[int, int, int, int, int]] = [
    (375, 512, 320, 8, 4),
    (1, 256, 128, 64, 8),
    (64, 256, 128, 64, 8),
    (1024, 256, 128, 64, 8),
]


def best_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Best wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def interleaved_best(methods: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Best time per method, running the methods round-robin so they see the same machine load."""
    for fn in methods.values():  # warm-up (allocations, first-call dispatch)
        fn()
    best = {name: math.inf for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


@dataclass
class MachineRates:
    gemm_flops: float  # fp32 GEMM FLOP/s (torch.mm)
    bandwidth: float  # bytes/s of a large copy (read + write)
    read_bandwidth: float = 0.0  # bytes/s of a streaming read (torch.sum over a buffer larger than the caches)

    def roofline(self, flops: float, bytes_moved: float) -> float:
        # the weights are only read: the faster of the two measured streams bounds what any kernel can do
        return max(flops / self.gemm_flops, bytes_moved / max(self.bandwidth, self.read_bandwidth))


class RateProbes:
    """The three measurements behind a roofline (a square fp32 GEMM, a large copy, a streaming read), as callables
    that can join a round-robin with the ops they bound."""

    def __init__(self, gemm_n: int = 2048, copy_mib: int = 256, read_mib: int = 512):
        self.gemm_n = gemm_n
        self.a, self.b = torch.randn(gemm_n, gemm_n), torch.randn(gemm_n, gemm_n)
        self.src = torch.randn(copy_mib * 1024 * 1024 // 4)
        self.dst = torch.empty_like(self.src)
        self.big = torch.ones(read_mib * 1024 * 1024 // 4)

    def methods(self) -> Dict[str, Callable[[], object]]:
        return {
            "rate: square GEMM": lambda: torch.mm(self.a, self.b),
            "rate: copy": lambda: self.dst.copy_(self.src),
            "rate: read": lambda: self.big.sum(),
        }

    def rates(self, times: Dict[str, float]) -> MachineRates:
        """Rates from the best times of methods() (the entries are removed from `times`)."""
        t_mm, t_copy, t_read = (times.pop(name) for name in self.methods())
        return MachineRates(2.0 * self.gemm_n**3 / t_mm, 2.0 * self.src.numel() * 4 / t_copy,
                            self.big.numel() * 4 / t_read)


def merge_rates(*rates: MachineRates) -> MachineRates:
    """The best rates seen (the machine's capability when it was least disturbed)."""
    return MachineRates(max(r.gemm_flops for r in rates), max(r.bandwidth for r in rates),
                        max(r.read_bandwidth for r in rates))


# --------------------------------------------------------------------------------------------------------------
# MoE expert layer
# --------------------------------------------------------------------------------------------------------------
def eager_expert_loop(x, w_gate_up, w_down, weights, ids):
    """The transformers 5 eager experts forward (Qwen3MoeExperts / MixtralExperts): one_hot mask, loop over hit
    experts, gather, two Linear calls, index_add."""
    E = w_gate_up.shape[0]
    out = torch.zeros_like(x)
    with torch.no_grad():
        mask = F.one_hot(ids.long(), num_classes=E).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = e[0]
        pos, tok = torch.where(mask[e])
        gate, up = F.linear(x[tok], w_gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down[e]) * weights[tok, pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def torch_grouped_mm_experts(x, w_gate_up, w_down, weights, ids):
    """The same layer on torch._grouped_mm (sort, gather, two grouped GEMMs, weighted index_add)."""
    E, k = w_gate_up.shape[0], ids.shape[1]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    tok = order // k
    h = torch._grouped_mm(x[tok], w_gate_up.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offs)
    y = y * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, tok, y)


@dataclass
class MoERow:
    shape: Tuple[int, int, int, int, int]
    times: Dict[str, float]
    flops: float  # 2 * T * k * 3 * H * I
    bytes_moved: float  # expert weights touched + x + out
    routing: float  # route_topk + moe_plan + permute + combine
    notes: List[str] = field(default_factory=list)
    rates: Optional[MachineRates] = None  # measured in this shape's round-robin (None: use the run's rates)


def bench_moe_shape(shape, repeats: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32,
                    probes: Optional[RateProbes] = None) -> MoERow:
    """One shape, every tensor in `dtype` (fp32 for the issue's table; bf16 for the transformers-model case).
    With `probes`, the roofline's GEMM rate and bandwidths join the same round-robin as our op, so both see the
    same machine load (the host is shared: its rates move 10-30% between minutes)."""
    from . import ops

    T, H, I, E, k = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype)
    w_gate_up = (torch.randn(E, 2 * I, H, generator=gen) / math.sqrt(H)).to(dtype)
    w_down = (torch.randn(E, H, I, generator=gen) / math.sqrt(I)).to(dtype)
    logits = torch.randn(T, E, generator=gen)
    weights, ids = ops.route_topk(logits, k, renormalize=True)
    weights = weights.to(dtype)
    y_sorted = torch.randn(T * k, H, generator=gen).to(dtype)
    args = (x, w_gate_up, w_down, weights, ids)

    plan = ops.moe_plan(ids, E)
    # The routing pieces are timed one by one (sum of their best times): a single spike from another process would
    # otherwise land on the sum of four short ops.
    methods = {
        "ours": lambda: ops.fused_experts(*args),
        "eager": lambda: eager_expert_loop(*args),
        "route_topk": lambda: ops.route_topk(logits, k, renormalize=True),
        "moe_plan": lambda: ops.moe_plan(ids, E),
        "permute": lambda: ops.permute(x, plan),
        "combine": lambda: ops.combine(y_sorted, plan, weights),
    }
    notes = []
    try:
        torch_grouped_mm_experts(*args)
        methods["torch._grouped_mm"] = lambda: torch_grouped_mm_experts(*args)
    except (RuntimeError, AttributeError) as exc:  # unsupported on this build / shape
        notes.append(f"torch._grouped_mm unavailable: {exc}")
    if probes is not None:
        methods.update(probes.methods())
    with torch.inference_mode():
        times = interleaved_best(methods, repeats)
    rates = probes.rates(times) if probes is not None else None
    touched = int(torch.unique(ids).numel())
    flops = 2.0 * T * k * 3 * H * I
    size = torch.finfo(dtype).bits // 8
    bytes_moved = touched * 3 * H * I * size + 2 * T * H * size
    routing_time = sum(times.pop(name) for name in ("route_topk", "moe_plan", "permute", "combine"))
    return MoERow(shape, times, flops, bytes_moved, routing_time, notes, rates)


def format_moe_table(rows: Sequence[MoERow], rates: MachineRates, dtype: torch.dtype = torch.float32) -> str:
    """`rates`: the best seen in the whole run (header); each row's roofline uses the rates measured in its own
    round-robin where it has them."""
    per_row = any(r.rates is not None for r in rows)
    where = ("each row's roofline uses the GEMM rate and bandwidths measured in that row's own round-robin with "
             "the ops (rate column)" if per_row else "the roofline uses these rates")
    lines = [
        f"{str(dtype).replace('torch.', '')}, {torch.get_num_threads()} threads; best fp32 GEMM "
        f"{rates.gemm_flops / 1e9:.0f} GFLOP/s, copy bandwidth {rates.bandwidth / 1e9:.1f} GB/s, streaming read "
        f"{rates.read_bandwidth / 1e9:.1f} GB/s seen in this run; {where}. roofline = max(FLOPs / GEMM rate, expert "
        "weight bytes / the faster bandwidth); eager / roofline is the most any kernel could beat the eager loop by.",
        "",
        "| T, H, I, E, k | ours ms | eager loop ms | torch._grouped_mm ms | roofline ms | ours / roofline "
        "| eager / ours | eager / roofline | _grouped_mm / ours | routing+plan+permute+combine / ours "
        "| rate: GFLOP/s, GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours, eager = r.times["ours"], r.times["eager"]
        row_rates = r.rates if r.rates is not None else rates
        roofline = row_rates.roofline(r.flops, r.bytes_moved)
        gmm = r.times.get("torch._grouped_mm")
        bandwidth = max(row_rates.bandwidth, row_rates.read_bandwidth)
        lines.append(
            f"| {', '.join(map(str, r.shape))} | {ours * 1e3:.2f} | {eager * 1e3:.2f} | "
            f"{'n/a' if gmm is None else f'{gmm * 1e3:.2f}'} | {roofline * 1e3:.2f} | {ours / roofline:.2f}x | "
            f"{eager / ours:.2f}x | {eager / roofline:.2f}x | {'n/a' if gmm is None else f'{gmm / ours:.2f}x'} | "
            f"{100 * r.routing / ours:.1f}% | {row_rates.gemm_flops / 1e9:.0f}, {bandwidth / 1e9:.1f} |"
        )
    return "\n".join(lines)


def run_moe_table(shapes, repeats: int = 3, log: Optional[Callable[[str], None]] = None,
                  dtype: torch.dtype = torch.float32) -> Tuple[str, List[MoERow]]:
    # Each shape measures the roofline's rates in its own round-robin with the ops (the ratios compare runs made
    # under the same load); the header reports the best rates of the whole run.
    probes = RateProbes()
    rows = []
    for shape in shapes:
        rows.append(bench_moe_shape(shape, repeats, dtype=dtype, probes=probes))
        if log:
            log(f"  measured {shape}")
    del probes
    return format_moe_table(rows, merge_rates(*(r.rates for r in rows)), dtype), rows


# --------------------------------------------------------------------------------------------------------------
# Audio downsampling
# --------------------------------------------------------------------------------------------------------------
# name, preset, D (encoder width), out (LLM width), frames per clip (50 Hz encoder frames), clips
DOWNSAMPLE_CASES = [
    ("Eureka 4 x 30 s", "eureka", 1280, 2048, [1500, 1500, 1500, 1500]),
    ("Eureka ragged 30/12/5/20 s", "eureka", 1280, 2048, [1500, 600, 250, 1000]),
    ("Voxtral 4 x 30 s", "voxtral", 1280, 3072, [1500, 1500, 1500, 1500]),
    ("Ultravox ragged", "ultravox", 1280, 2048, [1500, 600, 250, 1000]),
    ("Qwen2-Audio pool", "qwen2-audio", 1280, None, [1500, 600, 250, 1000]),
]
DOWNSAMPLE_CASES_QUICK = [
    ("Eureka 4 x 8 s (tiny width)", "eureka", 384, 512, [400, 400, 400, 400]),
    ("Eureka ragged (tiny width)", "eureka", 384, 512, [400, 160, 60, 260]),
    ("Ultravox ragged (tiny width)", "ultravox", 384, 512, [400, 160, 60, 260]),
]


def eager_downsample_chain(x, lengths, *, k, pool, norm, norm_weight=None, norm_bias=None, w1=None, b1=None,
                           activation=None, w2=None, b2=None, eps=1e-5):
    """What a model writes with torch modules: pad to a multiple of k, reshape (or avg-pool), norm, Linear, act,
    Linear, then zero the padding rows of each clip."""
    B, T, D = x.shape
    T_out = -(-T // k)
    if pool == "stack":
        h = F.pad(x, (0, 0, 0, T_out * k - T)).reshape(B, T_out, k * D)
    else:  # a short last window averages the frames it has, as stack_norm_project does
        h = F.avg_pool1d(x.transpose(1, 2), k, k, ceil_mode=True).transpose(1, 2)
    if norm == "layer":
        h = F.layer_norm(h, (h.shape[-1],), norm_weight, norm_bias, eps)
    elif norm == "rms":
        h = F.rms_norm(h, (h.shape[-1],), norm_weight, eps)
    if w1 is not None:
        h = F.linear(h, w1, b1)
    if activation == "silu":
        h = F.silu(h)
    elif activation == "gelu":
        h = F.gelu(h)
    elif activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    if w2 is not None:
        h = F.linear(h, w2, b2)
    keep = torch.arange(T_out).unsqueeze(0) < ((lengths + k - 1) // k).unsqueeze(1)
    return h * keep.unsqueeze(-1)


def downsample_flops(preset: dict, rows: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of the projections of `rows` output rows (the GEMM roofline's numerator)."""
    flops = 0.0
    for w in (preset.get("w1"), preset.get("w2")):
        if w is not None:
            flops += 2.0 * rows * w.shape[0] * w.shape[1]
    return flops


def run_downsample_table(cases, repeats: int = 3) -> str:
    """ours vs the eager chain per case, with the GEMM roofline (projection FLOPs of the valid rows / fp32 GEMM
    rate measured in the same run, best of a square GEMM and the case's own first projection)."""
    from . import ops
    from .integrations.downsample_presets import downsample_preset

    lines = [
        f"fp32, {torch.get_num_threads()} threads; time of one batch (all clips padded to the longest); GEMM roofline "
        "= projection FLOPs of the valid rows / the best fp32 GEMM rate measured in this run.",
        "",
        "| case | preset | B x T x D | ours ms | eager chain ms | eager / ours | GEMM roofline ms | ours / roofline "
        "| eager / roofline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    square = torch.randn(2048, 2048)
    for label, preset_name, D, out, frames in cases:
        gen = torch.Generator().manual_seed(0)
        preset = downsample_preset(preset_name, D, out, generator=gen)
        B, T = len(frames), max(frames)
        k = preset["k"]
        x = torch.randn(B, T, D, generator=gen)
        lengths = torch.tensor(frames)
        ragged = any(f != T for f in frames)
        ours_kwargs = dict(preset, lengths=lengths if ragged else None)
        methods = {
            "ours": lambda: ops.stack_norm_project(x, **ours_kwargs),
            "eager": lambda: eager_downsample_chain(x, lengths, **preset),
            "square GEMM": lambda: torch.mm(square, square),
        }
        w1 = preset.get("w1")
        if w1 is not None:
            a = torch.randn(B * (-(-T // k)), w1.shape[1], generator=gen)
            methods["own GEMM"] = lambda: torch.mm(a, w1.t())
        with torch.inference_mode():
            times = interleaved_best(methods, repeats)
        rate = 2.0 * 2048 ** 3 / times["square GEMM"]
        if w1 is not None:
            rate = max(rate, 2.0 * a.shape[0] * w1.shape[0] * w1.shape[1] / times["own GEMM"])
        flops = downsample_flops(preset, sum(-(-f // k) for f in frames))
        if flops:
            roof = flops / rate
            roof_cells = f"{roof * 1e3:.2f} | {times['ours'] / roof:.2f}x | {times['eager'] / roof:.2f}x"
        else:
            roof_cells = "- | - | -"
        lines.append(f"| {label} | {preset_name} | {B} x {T} x {D} | {times['ours'] * 1e3:.2f} | "
                     f"{times['eager'] * 1e3:.2f} | {times['eager'] / times['ours']:.2f}x | {roof_cells} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------------------------
def record_section(key: str, title: str, table: str, path: str) -> None:
    """Writes one table into a results markdown file (bench/RESULTS.md) between its own markers, leaving every
    other section alone; a new table goes at the end of the "## Ops" section."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    block = f"{begin}\n### {title}\n\nRecorded {stamp} on {platform.processor() or platform.machine()}.\n\n{table}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif "## Ops" in text:  # first record of this table: append at the end of the Ops section
        head, rest = text.split("## Ops", 1)
        nxt = rest.find("\n## ")
        if nxt < 0:
            text = head + "## Ops" + rest.rstrip("\n") + "\n\n" + block + "\n"
        else:
            text = head + "## Ops" + rest[:nxt].rstrip("\n") + "\n\n" + block + "\n" + rest[nxt:]
    else:
        text = text.rstrip("\n") + "\n\n## Ops\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------------------------------------------
# How busy the machine was
# --------------------------------------------------------------------------------------------------------------
def _busy_cpu_seconds() -> Optional[float]:
    """CPU time all processes have used since boot (Linux /proc/stat), in seconds; None where unavailable."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system  # this process only: a child it spawns competes like any other process


class MachineLoad:
    """Measures how busy the machine was over an interval: the load average at both ends and the CPU time that
    other processes used (all CPU time less this process's), as an average number of cores taken from us.

    On a loaded machine the ratios of a benchmark invert (our op looks slower than eager), so the report goes above
    the tables and warns when other processes competed for the cores."""

    # other processes using more than this many cores on average make the timings unreliable
    COMPETING_CORES = 0.25

    def __init__(self):
        self.cores = os.cpu_count() or 1
        self.load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
        self._busy0, self._own0, self._t0 = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
        self.others_cores: Optional[float] = None
        self.load_end = None
        self.seconds = 0.0

    def stop(self) -> "MachineLoad":
        busy1, own1 = _busy_cpu_seconds(), _own_cpu_seconds()
        self.seconds = time.perf_counter() - self._t0
        self.load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
        if self._busy0 is not None and busy1 is not None and self.seconds > 0:
            self.others_cores = max(0.0, ((busy1 - self._busy0) - (own1 - self._own0)) / self.seconds)
        return self

    @property
    def competed(self) -> bool:
        if self.others_cores is not None:
            return self.others_cores > self.COMPETING_CORES
        # without /proc/stat: a 1-minute load above the core count at either end means others were running
        loads = [x[0] for x in (self.load_start, self.load_end) if x is not None]
        return bool(loads) and max(loads) > self.cores

    def report(self) -> str:
        def fmt(load):
            return "n/a" if load is None else " / ".join(f"{x:.2f}" for x in load)

        lines = [f"machine load: {self.cores} cores; load average (1/5/15 min) {fmt(self.load_start)} at the start, "
                 f"{fmt(self.load_end)} at the end of {self.seconds:.0f} s"]
        if self.others_cores is not None:
            lines[0] += f"; other processes used {self.others_cores:.2f} cores on average meanwhile"
        if self.competed:
            lines.append(f"WARNING: other processes competed for the cores during this run: the times below are "
                         f"inflated and the ratios unreliable (ours can read slower than eager). Rerun on an idle "
                         f"machine.")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# `eureka-audio bench`
# --------------------------------------------------------------------------------------------------------------
def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark the kernels on this machine (MoE layer, downsampling)")
    p.add_argument("--quick", action="store_true", help="quick sizes (the default; under about a minute)")
    p.add_argument("--full", action="store_true", help="the full shapes of bench/moe.py and bench/downsample.py")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per method (best is reported)")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    import sys

    from . import ops
    from .cli import CommandError

    if args.repeats is not None and args.repeats < 1:
        raise CommandError(f"--repeats must be >= 1, got {args.repeats}")
    full = bool(args.full)
    repeats = args.repeats or (3 if full else 3)
    print(f"eureka_fast ops backend: {ops.backend()}  (torch {torch.__version__}, {torch.get_num_threads()} threads)",
          flush=True)
    print("measuring (the tables follow the machine-load report) ...", file=sys.stderr, flush=True)
    load = MachineLoad()
    moe_table, _ = run_moe_table(MOE_SHAPES if full else MOE_SHAPES_QUICK, repeats)
    downsample_table = run_downsample_table(DOWNSAMPLE_CASES if full else DOWNSAMPLE_CASES_QUICK, repeats)
    print(load.stop().report())
    print("\n## MoE expert layer (fused_experts vs the transformers eager loop and torch._grouped_mm)\n")
    print(moe_table)
    print("\n## Fused audio downsampling (stack_norm_project vs the eager module chain)\n")
    print(downsample_table)
    return 0
