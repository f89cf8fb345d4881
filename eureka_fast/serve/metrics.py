"""Server metrics in the Prometheus text exposition format (no client library needed)."""
from __future__ import annotations

import bisect
import threading

# Seconds; the same upper bounds serve time to first token and whole-request latency.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PREFIX = "eureka_serve"


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out.append(f"{name}_sum {self.total:.6f}")
        out.append(f"{name}_count {self.n}")
        return out


class Metrics:
    """Counters the engine and the HTTP layer update; render() gives the /metrics page."""

    def __init__(self):
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_cancelled = 0
        self.finished: dict[str, int] = {}
        self.rejected: dict[str, int] = {}  # HTTP status -> count, requests answered with an error before the engine
        self.ttft = Histogram()
        self.latency = Histogram()
        # where a first token waits: in the queue (behind others' prefills and a decode step), then in its own
        # admission's prefill (encoder, adapter and LLM prefill of the whole admission)
        self.queue_wait = Histogram()
        self.prefill = Histogram()
        self.prefill_windows = 0
        self.decode_steps = 0
        self.decode_seconds = 0.0

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_latency(self, seconds: float) -> None:
        with self._lock:
            self.latency.observe(seconds)

    def observe_queue_wait(self, seconds: float) -> None:
        with self._lock:
            self.queue_wait.observe(seconds)

    def observe_prefill(self, seconds: float, windows: int) -> None:
        with self._lock:
            self.prefill.observe(seconds)
            self.prefill_windows += windows

    def observe_decode_step(self, seconds: float) -> None:
        with self._lock:
            self.decode_steps += 1
            self.decode_seconds += seconds

    def count_finished(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def count_rejected(self, status: int) -> None:
        with self._lock:
            key = str(status)
            self.rejected[key] = self.rejected.get(key, 0) + 1

    def render(self) -> str:
        p = PREFIX
        with self._lock:
            lines = []
            for name, kind, text, value in (
                    ("num_requests_waiting", "gauge", "Requests queued for a slot.", self.waiting),
                    ("num_requests_running", "gauge", "Sequences in the running batch.", self.running),
                    ("prompt_tokens_total", "counter", "Prompt tokens (audio pads included) of finished requests.",
                     self.prompt_tokens),
                    ("generation_tokens_total", "counter", "Generated tokens.", self.generation_tokens),
                    ("requests_cancelled_total", "counter", "Requests cancelled (client gone) before they finished.",
                     self.requests_cancelled)):
                lines += _scalar(f"{p}_{name}", kind, text, value)
            lines += [f"# HELP {p}_requests_finished_total Requests the engine finished, by reason.",
                      f"# TYPE {p}_requests_finished_total counter"]
            for reason in sorted(set(self.finished) | {"stop", "length"}):
                lines.append(f'{p}_requests_finished_total{{finished_reason="{reason}"}} '
                             f'{self.finished.get(reason, 0)}')
            lines += [f"# HELP {p}_requests_rejected_total Requests answered with an HTTP error before generation.",
                      f"# TYPE {p}_requests_rejected_total counter"]
            for status in sorted(self.rejected):
                lines.append(f'{p}_requests_rejected_total{{status="{status}"}} {self.rejected[status]}')
            lines += self.ttft.lines(f"{p}_time_to_first_token_seconds", "Time from arrival to the first token.")
            lines += self.latency.lines(f"{p}_e2e_request_latency_seconds", "Time from arrival to the last token.")
            lines += self.queue_wait.lines(f"{p}_queue_wait_seconds", "Time from arrival to admission.")
            lines += self.prefill.lines(f"{p}_prefill_seconds", "Duration of one admission's prefill forward.")
            lines += _scalar(f"{p}_prefill_audio_windows_total", "counter",
                             "Audio windows (30 s each) encoded at admission.", self.prefill_windows)
            lines += _scalar(f"{p}_decode_steps_total", "counter", "Decode steps of the running batch.",
                             self.decode_steps)
            lines += _scalar(f"{p}_decode_seconds_total", "counter", "Time spent in decode steps.",
                             f"{self.decode_seconds:.6f}")
        return "\n".join(lines) + "\n"


def _scalar(name: str, kind: str, text: str, value) -> list[str]:
    """One unlabelled gauge or counter in the Prometheus text format: its HELP, TYPE and sample lines."""
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
