"""`eureka-audio serve` under load: continuous batching vs the same requests one after another, and a soak run.

    python bench/serve.py                          # tiny + eureka-1.7b dims (2 encoder / 2 LLM layers), c = 1 4 16 32
    python bench/serve.py --configs tiny --soak    # + 500 requests at c = 32 with bad requests and disconnects

The server runs in a child process (this script with --worker: the same seeded random model, uvicorn on 127.0.0.1,
a free port); async streaming clients (httpx) in this process keep `c` requests in flight (closed loop). Each request
holds 1-4 s of audio and a question and generates exactly its number of tokens (0.5x to 1.5x --tokens; min_tokens =
max_tokens), so that the sequential baseline, ``EurekaAudio.generate(..., greedy=True, min_new_tokens=N,
max_new_tokens=N)`` on the same conversations in this process, does the same work. The host is shared and its
load drifts, so the baseline runs before the sweep and again after every level (the server idles meanwhile), and
each level is compared with the mean of the two baseline runs around it. Reported: requests/s, generated tokens/s
(and its ratio to the sequential rate), time to first token and latency p50/p99, the 1-minute load average before
and after the level. TTFT percentiles leave out the first c requests (they arrive together at t = 0: start-up, not
steady load).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import re
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_AUDIO_IDS = dict(audio_start_token_id=50259, audio_end_token_id=50260, audio_pad_token_id=50261,
                      text_vocab_size=50264)


def build(name: str):
    from eureka_fast.models import EurekaAudioConfig, EurekaAudioForCausalLM, EurekaAudioProcessor
    from eureka_fast.models.processing_eureka import build_tiny_tokenizer

    if name == "tiny":
        config = EurekaAudioConfig.preset("tiny")
        processor = EurekaAudioProcessor.preset("tiny")
    elif name == "eureka-1.7b-2L":
        # the real widths (Whisper-large-v3 encoder, Qwen3-1.7B, SPEC adapter), 2 layers each; the tiny GPT-2
        # tokenizer stands in for Qwen's (its audio ids are inside the 151936-entry vocabulary)
        config = EurekaAudioConfig.preset("eureka-1.7b", audio_config={"n_audio_layer": 2},
                                          text_config={"num_hidden_layers": 2}, **TINY_AUDIO_IDS)
        processor = EurekaAudioProcessor(build_tiny_tokenizer(), n_mels=128)
    else:
        raise ValueError(f"unknown config {name!r}")
    torch.manual_seed(0)
    model = EurekaAudioForCausalLM(config).eval()
    return model, processor


def wav_b64(samples: np.ndarray) -> str:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, 16000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


def workload(count: int, seed: int = 0):
    """(HTTP messages, the same conversation for EurekaAudio.generate) pairs: 1-4 s of audio + a question."""
    from eureka_fast.audio import load_audio

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        samples = (rng.standard_normal(int(16000 * (1 + i % 4))) * 0.1).astype(np.float32)
        data = wav_b64(samples)
        question = ["What is said?", "Describe the sound.", "Who is speaking, and how fast?",
                    "Summarise the audio in one sentence."][i % 4] + " " * (i % 3)
        http = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                                             {"type": "text", "text": question}]}]
        conv = [{"role": "user", "content": [{"type": "audio", "audio": load_audio(base64.b64decode(data))},
                                             {"type": "text", "text": question}]}]
        out.append((http, conv))
    return out


# ---------------------------------------------------------------------------------------------------------------
# server child process
# ---------------------------------------------------------------------------------------------------------------
def worker(args) -> int:
    import uvicorn

    from eureka_fast.serve import Engine, ServeOptions, create_app

    model, processor = build(args.worker)
    engine = Engine(model, processor, max_num_seqs=args.max_num_seqs, max_queue=1024,
                    max_prefill_windows=args.max_prefill_windows)
    app = create_app(engine, ServeOptions(served_model_name=args.worker, max_body_mb=64))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    original = server.startup

    async def startup(sockets=None):
        await original(sockets=sockets)
        print(f"PORT {server.servers[0].sockets[0].getsockname()[1]}", flush=True)

    server.startup = startup
    server.run()
    return 0


class Child:
    def __init__(self, config: str, max_num_seqs: int, max_prefill_windows: int = 1):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", config,
                                      "--max-num-seqs", str(max_num_seqs),
                                      "--max-prefill-windows", str(max_prefill_windows)],
                                     stdout=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 600
        self.url = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            found = re.match(r"PORT (\d+)", line)
            if found:
                self.url = f"http://127.0.0.1:{found.group(1)}"
                break
        if self.url is None:
            self.stop()
            raise RuntimeError("the server child did not start")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            return int(re.search(r"VmRSS:\s+(\d+)", fh.read()).group(1)) / 1024

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


# ---------------------------------------------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------------------------------------------
async def one_request(client, url, model, messages, tokens, *, stream=True, disconnect=False):
    """(status, text, ttft, latency, completion_tokens); disconnect: drop the stream after the first delta."""
    body = {"model": model, "messages": messages, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0}
    start = time.perf_counter()
    if not stream:
        r = await client.post(url + "/v1/chat/completions", json=body)
        end = time.perf_counter()
        if r.status_code != 200:
            return r.status_code, None, None, end - start, 0
        obj = r.json()
        return 200, obj["choices"][0]["message"]["content"], None, end - start, obj["usage"]["completion_tokens"]
    body.update(stream=True, stream_options={"include_usage": True})
    text, ttft, usage = [], None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None, None, time.perf_counter() - start, 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]["completion_tokens"]
            for choice in obj.get("choices", []):
                if ttft is None:  # the server sends a stream's first chunk at its first token
                    ttft = time.perf_counter() - start
                piece = choice["delta"].get("content")
                if piece:
                    text.append(piece)
                    if disconnect:
                        return 200, None, ttft, time.perf_counter() - start, 0
    return 200, "".join(text), ttft, time.perf_counter() - start, usage


async def closed_loop(url, model, jobs, concurrency, sent_at=None):
    """Run jobs with `concurrency` in flight; sent_at (a list) gets each job's start, seconds into the run."""
    import httpx

    results = [None] * len(jobs)
    next_job = 0

    async def run_worker(client):
        nonlocal next_job
        while next_job < len(jobs):
            index = next_job
            next_job += 1
            if sent_at is not None:
                sent_at.append((index, time.perf_counter() - start))
            results[index] = await jobs[index](client)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(run_worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return results, wall


def engine_counters(url) -> dict:
    """The engine's time counters from /metrics: queue waits, prefills (per admission), decode steps."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=60).text

    def value(name):
        return float(re.search(rf"^eureka_serve_{name} (\S+)$", text, re.M).group(1))

    return {key: value(name) for key, name in (
        ("queue_wait_s", "queue_wait_seconds_sum"), ("admitted", "queue_wait_seconds_count"),
        ("prefill_s", "prefill_seconds_sum"), ("prefills", "prefill_seconds_count"),
        ("windows", "prefill_audio_windows_total"), ("decode_steps", "decode_steps_total"),
        ("decode_s", "decode_seconds_total"))}


def profile(before: dict, after: dict) -> dict:
    """Where a level's time went: mean queue wait per request, mean prefill per admission, mean decode step."""
    d = {k: after[k] - before[k] for k in after}
    return {"admitted": int(d["admitted"]), "queue_wait_mean_s": d["queue_wait_s"] / max(d["admitted"], 1),
            "prefills": int(d["prefills"]), "windows": int(d["windows"]),
            "prefill_mean_s": d["prefill_s"] / max(d["prefills"], 1), "prefill_total_s": d["prefill_s"],
            "decode_steps": int(d["decode_steps"]), "decode_step_mean_s": d["decode_s"] / max(d["decode_steps"], 1),
            "decode_total_s": d["decode_s"]}


def pct(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo, hi = int(np.floor(k)), int(np.ceil(k))
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------------------------------
def sweep(config: str, args) -> dict:
    from eureka_fast.inference import EurekaAudio

    def tokens_for(i):
        # 0.5x .. 1.5x --tokens (mean --tokens): equal lengths would keep closed-loop clients in lockstep waves
        return max(1, round(args.tokens * (0.5 + (i % 5) / 4)))

    model, processor = build(config)
    reference = EurekaAudio(model, processor)
    work = workload(max(args.sequential, int(args.rounds * max(args.concurrency))))
    # the sequential baseline: the same conversations and token counts through EurekaAudio.generate
    reference.generate(work[0][1], greedy=True, max_new_tokens=4)  # warm-up

    def sequential():
        start = time.perf_counter()
        texts = [reference.generate(conv, greedy=True, max_new_tokens=tokens_for(i), min_new_tokens=tokens_for(i))
                 for i, (_, conv) in enumerate(work[:args.sequential])]
        return texts, time.perf_counter() - start

    # The host is shared and its load drifts: the sequential baseline runs before the sweep and again after every
    # level, and each level is compared with the mean of the two baseline runs around it.
    expected, seq_wall = sequential()
    seq_walls = [seq_wall]
    seq_tokens = sum(tokens_for(i) for i in range(args.sequential))
    out = {"config": config, "tokens": args.tokens}

    def level(child, c):
        n = max(args.sequential, int(args.rounds * c))
        jobs = [(lambda client, m=work[i][0], t=tokens_for(i): one_request(client, child.url, config, m, t))
                for i in range(n)]
        load_before = os.getloadavg()[0]
        counters = engine_counters(child.url)
        sent_at = []
        results, wall = asyncio.run(closed_loop(child.url, config, jobs, c, sent_at))
        spent = profile(counters, engine_counters(child.url))
        load_after = os.getloadavg()[0]
        assert all(r[0] == 200 for r in results), [r[0] for r in results]
        mismatches = sum(1 for i, r in enumerate(results) if i < len(expected) and r[1] != expected[i])
        tokens = sum(r[4] for r in results)
        steady = results[c:] if len(results) > c else results
        ttft = [r[2] for r in steady]
        latency = [r[3] for r in results]
        again, seq_wall = sequential()
        assert again == expected
        seq_walls.append(seq_wall)
        seq_tps = seq_tokens / ((seq_walls[-2] + seq_walls[-1]) / 2)
        row = {"concurrency": c, "requests": n, "wall_s": wall, "req_s": n / wall, "gen_tok_s": tokens / wall,
               "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
               "latency_p50": pct(latency, 50), "latency_p99": pct(latency, 99),
               "text_mismatches_vs_generate": mismatches, "sequential_gen_tok_s": seq_tps,
               "vs_sequential": tokens / wall / seq_tps, "load_1min": [load_before, load_after],
               "ttft_p99_over_p50": pct(ttft, 99) / pct(ttft, 50), "engine": spent,
               # per request: (index, sent at s into the level, time to first token s)
               "ttft_by_request": [(i, round(at, 2), round(results[i][2], 2)) for i, at in sorted(sent_at)]}
        print(json.dumps(row), flush=True)
        return row

    rows = []
    child = Child(config, args.max_num_seqs, args.max_prefill_windows)  # idle (no CPU) while the baseline runs
    try:
        warm = [(lambda client, m=work[i][0]: one_request(client, child.url, config, m, 4)) for i in range(2)]
        asyncio.run(closed_loop(child.url, config, warm, 2))
        for c in args.concurrency:
            rows.append(level(child, c))
    finally:
        child.stop()
    out["rows"] = rows
    mean_wall = sum(seq_walls) / len(seq_walls)
    out["sequential"] = {"requests": args.sequential, "wall_s": seq_walls, "req_s": args.sequential / mean_wall,
                         "gen_tok_s": seq_tokens / mean_wall}
    return out


def soak(args) -> dict:
    """500 requests at c = 32: 10% bad, 5% streams dropped mid-answer, the rest checked against generate."""
    import httpx

    from eureka_fast.inference import EurekaAudio

    config = "tiny"
    model, processor = build(config)
    reference = EurekaAudio(model, processor)
    # one prompt in ten holds audio (every request with audio costs a whole 30 s encoder window)
    pool = workload(2, seed=1) + [([{"role": "user", "content": q}], [{"role": "user", "content": q}]) for q in (
        "Tell me about foxes.", "What is the weather like?", "Count to ten.", "Name three colours.",
        "Why is the sky blue?", "Describe a cat.", "Write a haiku.", "What is two plus two?",
        "Say hello.", "Explain batching.", "List some fruit.", "Who wrote Hamlet?", "What time is it?",
        "Translate 'good morning'.", "Give me a word.", "Spell 'audio'.", "Summarise the news.",
        "What is a tensor?")]
    tokens = 12
    expected = [reference.generate(conv, greedy=True, max_new_tokens=tokens, min_new_tokens=tokens)
                for _, conv in pool]
    del reference, model
    rng = random.Random(0)
    kinds = ["bad"] * 50 + ["disconnect"] * 25 + ["good"] * 425
    rng.shuffle(kinds)
    bad_bodies = [b'{"messages": [', json.dumps({"model": config, "messages": "x"}).encode(),
                  json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(),
                  json.dumps({"model": config, "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}).encode(),
                  json.dumps({"model": config, "messages": [{"role": "user", "content": [{"type": "input_audio",
                              "input_audio": {"data": base64.b64encode(b"junk" * 100).decode()}}]}]}).encode()]
    child = Child(config, 32, args.max_prefill_windows)
    rss = []
    try:
        def job(i, kind):
            async def run(client):
                if i % 50 == 0:
                    rss.append((i, child.rss_mb()))
                if kind == "bad":
                    r = await client.post(child.url + "/v1/chat/completions", content=bad_bodies[i % len(bad_bodies)],
                                          headers={"Content-Type": "application/json"})
                    return kind, i, r.status_code, None
                messages = pool[i % len(pool)][0]
                status, text, *_ = await one_request(client, child.url, config, messages, tokens,
                                                     stream=(kind == "disconnect" or i % 2 == 0),
                                                     disconnect=(kind == "disconnect"))
                return kind, i, status, text
            return run

        jobs = [job(i, k) for i, k in enumerate(kinds)]
        results, wall = asyncio.run(closed_loop(child.url, config, jobs, 32))
        time.sleep(1.0)
        metrics = httpx.get(child.url + "/metrics").text
        rss.append((len(kinds), child.rss_mb()))
    finally:
        child.stop()
    good = [r for r in results if r[0] == "good"]
    bad = [r for r in results if r[0] == "bad"]
    gauge = {name: float(re.search(rf"^eureka_serve_{name} (\S+)$", metrics, re.M).group(1))
             for name in ("num_requests_running", "num_requests_waiting", "requests_cancelled_total")}
    out = {"requests": len(results), "answered": sum(r is not None for r in results), "wall_s": wall,
           "good": len(good), "good_correct": sum(r[2] == 200 and r[3] == expected[r[1] % len(pool)] for r in good),
           "bad": len(bad), "bad_4xx": sum(400 <= r[2] < 500 for r in bad),
           "disconnects": sum(r[0] == "disconnect" for r in results), **gauge, "rss_mb": rss}
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "eureka-1.7b-2L"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--tokens", type=int, default=128, help="generated tokens per request")
    parser.add_argument("--sequential", type=int, default=8, help="requests in the sequential baseline")
    parser.add_argument("--rounds", type=float, default=2.0, help="requests per level = rounds x concurrency (at "
                                                                  "least --sequential)")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-prefill-windows", type=int, default=1, help="the server's audio windows per "
                                                                             "admission (default 1, as serve's)")
    parser.add_argument("--soak", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true", help="only the soak run")
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = {"sweeps": [] if args.skip_sweep else [sweep(c, args) for c in args.configs]}
    if args.soak:
        results["soak"] = soak(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    for s in results["sweeps"]:
        seq = s["sequential"]
        print(f"\n{s['config']}: sequential EurekaAudio.generate {seq['req_s']:.3f} req/s, "
              f"{seq['gen_tok_s']:.2f} gen tok/s over {len(seq['wall_s'])} runs ({s['tokens']} tokens per request "
              f"on average)")
        print("| c | req/s | gen tok/s | sequential gen tok/s | vs sequential | TTFT p50 / p99 (s) | p99 / p50 | "
              "latency p50 / p99 (s) | text = generate | load (1 min) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in s["rows"]:
            print(f"| {r['concurrency']} | {r['req_s']:.3f} | {r['gen_tok_s']:.2f} | {r['sequential_gen_tok_s']:.2f} | "
                  f"{r['vs_sequential']:.2f}x | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
                  f"{r['ttft_p99_over_p50']:.2f}x | "
                  f"{r['latency_p50']:.2f} / {r['latency_p99']:.2f} | "
                  f"{'yes' if r['text_mismatches_vs_generate'] == 0 else 'NO (%d)' % r['text_mismatches_vs_generate']} | "
                  f"{r['load_1min'][0]:.1f}-{r['load_1min'][1]:.1f} |")
        print("\n| c | queue wait mean (s) | prefills | windows | prefill mean (s) | decode steps | "
              "decode step mean (s) |")
        print("|---|---|---|---|---|---|---|")
        for r in s["rows"]:
            e = r["engine"]
            print(f"| {r['concurrency']} | {e['queue_wait_mean_s']:.2f} | {e['prefills']} | {e['windows']} | "
                  f"{e['prefill_mean_s']:.2f} | {e['decode_steps']} | {e['decode_step_mean_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
