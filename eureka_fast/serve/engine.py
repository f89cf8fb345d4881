"""The serving engine: one scheduler thread owns the model and runs continuous (iteration-level) batching.

Each loop iteration: drop finished / cancelled rows, admit waiting requests into free slots (their audio encoded and
their prompts prefilled together, one forward), then one decode step for every running row. Requests therefore join
and leave the running batch at decode-step boundaries. An admission takes at most ``max_prefill_windows`` audio
windows and ``max_prefill_tokens`` prompt tokens (the head of the queue always fits): a request that arrives waits
behind at most that much encoder work of others before its own, and the running rows get a decode step between
admissions.

KV cache: ``kv.BatchKV``, one buffer per layer whose rows are the running sequences, right-aligned (left padding);
a decode step writes its column in place. A new prefill is left-padded to the batch's length (or the batch to its),
rows that leave are compacted out, and columns that have become padding in every row are given up. Each row carries
its own attention mask and position ids, so a row computes the same attention as it would alone (docs/serving.md).

Sampling follows transformers' ``generate``: repetition penalty over the prompt and generated ids, then temperature,
top-k, top-p; greedy (temperature 0) is the argmax after the repetition penalty, as ``EurekaAudio.generate(...,
greedy=True)`` decodes. Each request samples from its own ``torch.Generator``.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..inference import OFFICIAL_DECODING
from .kv import BatchKV
from .metrics import Metrics

log = logging.getLogger("eureka_fast.serve")

# The official decoding defaults, read from their one definition (a request's fields override them).
DEFAULT_TEMPERATURE = float(OFFICIAL_DECODING["temperature"])
DEFAULT_TOP_P = float(OFFICIAL_DECODING["top_p"])
DEFAULT_TOP_K = int(OFFICIAL_DECODING["top_k"])
DEFAULT_REPETITION_PENALTY = float(OFFICIAL_DECODING["repetition_penalty"])
DEFAULT_MAX_TOKENS = int(OFFICIAL_DECODING["max_new_tokens"])


class EngineError(RuntimeError):
    """A request failed inside the engine (its message is safe to show a client)."""


class QueueFull(RuntimeError):
    """More requests are waiting than the engine queues."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no more requests."""


@dataclass
class SamplingParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy
    top_p: float = DEFAULT_TOP_P  # 1 = off
    top_k: int = DEFAULT_TOP_K  # 0 = off
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY  # 1 = off
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Prompt:
    """One conversation turned into model inputs (the processor's output for a batch of one)."""

    input_ids: list[int]
    input_features: torch.Tensor  # [W, n_mels, 3000] (W = 0 without audio)
    audio_token_counts: list[int]
    token_type_ids: list[int]

    @property
    def windows(self) -> int:
        return int(self.input_features.shape[0])

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Event:
    """What the engine tells a request's sink: kind "delta" (text), "done" (finish_reason) or "error" (message)."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    message: str = ""
    code: str = ""  # for errors: "queue_timeout", "shutdown" or "engine_error"


@dataclass(eq=False)
class Request:
    prompt: Prompt
    params: SamplingParams
    sink: Callable[[Event], None]
    request_id: str = ""
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    generated: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)  # generated ids that are text (EOS excluded)
    sent: str = ""  # text already sent to the sink
    cancelled: bool = False
    finished: bool = False
    # scheduler-owned
    seen: torch.Tensor | None = None  # ids the repetition penalty applies to (prompt + generated), unique
    seen_ids: set = field(default_factory=set)  # the same ids, for membership tests without a host sync
    generator: torch.Generator | None = None


class Engine:
    """Continuous-batching generation over an ``EurekaAudioForCausalLM`` and its processor.

    submit() may be called from any thread; the request's ``sink`` is called from the scheduler thread with Events
    (several "delta", then one "done" or one "error"). cancel() frees the request's slot at the next step.
    """

    def __init__(self, model, processor, *, max_num_seqs: int = 16, max_queue: int = 256,
                 queue_timeout_s: float = 600.0, max_model_len: int | None = None, max_prefill_tokens: int = 8192,
                 max_prefill_windows: int = 1, metrics: Metrics | None = None):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_prefill_windows < 1 or max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_windows and max_prefill_tokens must be >= 1, got {max_prefill_windows} "
                             f"and {max_prefill_tokens}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model.eval()
        self.processor = processor
        self.max_num_seqs = int(max_num_seqs)
        self.max_queue = int(max_queue)
        self.queue_timeout_s = float(queue_timeout_s)
        context = int(getattr(model.config.text_config, "max_position_embeddings", 0) or 0) or None
        self.max_model_len = int(max_model_len or context or 32768)
        if context and self.max_model_len > context:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's context ({context} positions)")
        # An admission's prefill stalls the running rows and every request queued behind it for its duration, and
        # its rows get their first token only when the whole admission is done. Bounding its audio windows (30 s
        # of encoder work each, the bulk of a prefill on a CPU) and prompt tokens bounds how long an arrival waits
        # behind others' prefills: with one window, at most one other request's encoder pass.
        self.max_prefill_tokens = int(max_prefill_tokens)
        self.max_prefill_windows = int(max_prefill_windows)
        self.metrics = metrics or Metrics()
        self.eos_ids = list(processor.eos_token_ids)
        self.pad_id = int(processor.pad_token_id)
        self.device = next(model.parameters()).device
        self._cond = threading.Condition()
        self._waiting: list[Request] = []
        self._running: list[Request] = []
        self._kv: BatchKV | None = None  # the running rows' keys, values and attention mask
        self._positions: torch.Tensor | None = None  # [B] position of the next token
        self._last: torch.Tensor | None = None  # [B] last sampled token
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None

    # --- public ---------------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="eureka-serve-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Fail what is still waiting or running ("server shutting down") and stop the scheduler thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def num_waiting(self) -> int:
        return len(self._waiting)

    def num_running(self) -> int:
        return len(self._running)

    def prepare(self, messages: list) -> Prompt:
        """Model inputs for one conversation (audio items must already be arrays: nothing is fetched here)."""
        inputs = self.processor([messages], add_generation_prompt=True, padding_side="left")
        return Prompt(input_ids=inputs["input_ids"][0].tolist(), input_features=inputs["input_features"],
                      audio_token_counts=inputs["audio_token_counts"].tolist(),
                      token_type_ids=inputs["token_type_ids"][0].tolist())

    def submit(self, prompt: Prompt, params: SamplingParams, sink: Callable[[Event], None],
               request_id: str = "") -> Request:
        if len(prompt) + 1 > self.max_model_len:
            raise ValueError(f"the prompt is {len(prompt)} tokens (audio included) but the model's context is "
                             f"{self.max_model_len} tokens")
        request = Request(prompt=prompt, params=params, sink=sink, request_id=request_id)
        with self._cond:
            if self._stopping or self._thread is None:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self._waiting.append(request)
            self.metrics.waiting = len(self._waiting)
            self._cond.notify_all()
        return request

    def submit_many(self, prompt: Prompt, params_list: list[SamplingParams], sinks: list, request_id: str = ""):
        """Several samples of one prompt (n > 1), admitted to the queue together or not at all."""
        with self._cond:
            if self._stopping or self._thread is None:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) + len(params_list) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})")
        if len(prompt) + 1 > self.max_model_len:
            raise ValueError(f"the prompt is {len(prompt)} tokens (audio included) but the model's context is "
                             f"{self.max_model_len} tokens")
        requests = [Request(prompt=prompt, params=p, sink=s, request_id=f"{request_id}-{i}")
                    for i, (p, s) in enumerate(zip(params_list, sinks))]
        with self._cond:
            self._waiting.extend(requests)
            self.metrics.waiting = len(self._waiting)
            self._cond.notify_all()
        return requests

    def cancel(self, request: Request) -> None:
        with self._cond:
            if not request.finished:
                request.cancelled = True
                self._cond.notify_all()

    def generate(self, prompt: Prompt, params: SamplingParams, timeout: float = 600.0) -> tuple[str, str, int]:
        """Blocking helper: (text, finish_reason, completion_tokens) of one request."""
        events: queue.Queue = queue.Queue()
        self.submit(prompt, params, events.put)
        text = []
        deadline = time.monotonic() + timeout
        while True:
            event = events.get(timeout=max(0.0, deadline - time.monotonic()))
            if event.kind == "delta":
                text.append(event.text)
            elif event.kind == "done":
                return "".join(text), event.finish_reason, event.completion_tokens
            else:
                raise EngineError(event.message)

    # --- scheduler ------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self._stopping and not self._waiting and not self._running:
                            self._cond.wait(timeout=1.0)
                        if self._stopping:
                            break
                        admitted = self._admit()
                    self._drop_finished()
                    if admitted:
                        self._prefill(admitted)
                    if self._running:
                        self._decode_step()
                    self._drop_finished()
        except BaseException as exc:  # a bug in the scheduler itself: fail everyone rather than hang them
            log.exception("engine loop died")
            self._dead = exc
        finally:
            with self._cond:
                self._stopping = True
                pending = self._waiting + self._running
                self._waiting, self._running = [], []
            for request in pending:
                if self._dead is None:
                    self._fail(request, "the server is shutting down", code="shutdown")
                else:
                    self._fail(request, "the engine stopped after an internal error")
            self._reset_batch()
            self.metrics.waiting = 0
            self.metrics.running = 0

    def _admit(self) -> list[Request]:
        """Waiting requests that get a slot now (caller holds the lock); expired or cancelled ones are answered."""
        now = time.monotonic()
        admitted: list[Request] = []
        keep: list[Request] = []
        free = self.max_num_seqs - len(self._running)
        budget = self.max_prefill_tokens
        windows = self.max_prefill_windows
        for request in self._waiting:
            if request.cancelled:
                self._finish(request, None)
            elif now - request.arrival > self.queue_timeout_s:
                self._fail(request, f"waited more than {self.queue_timeout_s:g} s for a free slot", code="queue_timeout")
            elif free > 0 and (not admitted or (len(request.prompt) <= budget and request.prompt.windows <= windows)):
                self.metrics.observe_queue_wait(now - request.arrival)
                admitted.append(request)
                free -= 1
                budget -= len(request.prompt)
                windows -= request.prompt.windows
            else:
                keep.append(request)
        self._waiting = keep
        self.metrics.waiting = len(keep)
        return admitted

    def _prefill(self, requests: list[Request]) -> None:
        start = time.monotonic()
        try:
            cache, mask, logits = self._forward_prefill(requests)
        except Exception as exc:
            if len(requests) == 1:
                log.exception("prefill failed")
                self._fail(requests[0], f"the model failed on this request ({type(exc).__name__})")
                return
            # Find the request(s) at fault: each alone; the others still run.
            for request in requests:
                self._prefill([request])
            return
        self.metrics.observe_prefill(time.monotonic() - start, sum(r.prompt.windows for r in requests))
        for request in requests:
            request.seen_ids = set(request.prompt.input_ids)
            request.seen = torch.tensor(sorted(request.seen_ids), dtype=torch.long, device=self.device)
            if not request.params.greedy:
                request.generator = torch.Generator(device=self.device)
                seed = request.params.seed
                request.generator.manual_seed(int(seed) if seed is not None else
                                              int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
        positions = torch.tensor([len(r.prompt) for r in requests], dtype=torch.long, device=self.device)
        self._merge(requests, cache, mask, positions)
        tokens = self._sample(logits, requests)
        self._accept(requests, tokens, offset=len(self._running) - len(requests))

    def _forward_prefill(self, requests: list[Request]):
        length = max(len(r.prompt) for r in requests)
        n = len(requests)
        ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        types = torch.zeros(n, length, dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.long)
        for i, r in enumerate(requests):
            k = len(r.prompt)
            ids[i, length - k:] = torch.tensor(r.prompt.input_ids)
            types[i, length - k:] = torch.tensor(r.prompt.token_type_ids)
            mask[i, length - k:] = 1
        features = [r.prompt.input_features for r in requests if r.prompt.windows]
        first = requests[0].prompt.input_features
        feats = torch.cat(features) if features else first.new_zeros((0,) + tuple(first.shape[1:]))
        windows = torch.tensor([r.prompt.windows for r in requests], dtype=torch.long)
        counts = torch.tensor([c for r in requests for c in r.prompt.audio_token_counts], dtype=torch.long)
        positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
        dev = self.device
        out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), token_type_ids=types.to(dev),
                         input_features=feats.to(dev, self.model.dtype), windows_per_request=windows.to(dev),
                         audio_token_counts=counts.to(dev), position_ids=positions.to(dev), use_cache=True,
                         logits_to_keep=1)
        return out.cache, mask.to(dev), out.logits[:, -1, :].float()

    def _decode_step(self) -> None:
        mask = self._kv.step()
        start = time.monotonic()
        try:
            out = self.model.language_model(input_ids=self._last[:, None], attention_mask=mask,
                                            position_ids=self._positions[:, None], cache=self._kv.cache,
                                            use_cache=True)
        except Exception as exc:
            # A decode step serves every running row at once: they all fail, the queue goes on.
            log.exception("decode step failed")
            for request in list(self._running):
                self._fail(request, f"the model failed during decoding ({type(exc).__name__})")
            self._reset_batch()
            return
        self._kv.advance()
        self._positions = self._positions + 1
        tokens = self._sample(out.logits[:, -1, :].float(), self._running)
        self.metrics.observe_decode_step(time.monotonic() - start)
        self._accept(self._running, tokens, offset=0)

    # --- batch cache ----------------------------------------------------------------------------------------------
    def _merge(self, requests, cache, mask, positions) -> None:
        """Append prefilled rows to the running batch (the shorter side gets padding on the left)."""
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        if self._kv is None:
            self._kv = BatchKV(len(layers), self.max_num_seqs)
        self._kv.append(layers, mask)
        last = torch.zeros(len(requests), dtype=torch.long, device=self.device)
        if not self._running:
            self._positions, self._last = positions, last
        else:
            self._positions = torch.cat([self._positions, positions])
            self._last = torch.cat([self._last, last])
        self._running.extend(requests)
        self.metrics.running = len(self._running)

    def _drop_finished(self) -> None:
        with self._cond:
            for request in self._running:
                if request.cancelled and not request.finished:
                    self._finish(request, None)
            keep = [i for i, r in enumerate(self._running) if not r.finished]
            if len(keep) == len(self._running):
                return
            if not keep:
                self._reset_batch()
                return
            self._kv.keep(keep)
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self._positions = self._positions.index_select(0, index)
            self._last = self._last.index_select(0, index)
            # the gauge first: a reader that sees the smaller batch must not see the older gauge
            self.metrics.running = len(keep)
            self._running = [self._running[i] for i in keep]

    def _reset_batch(self) -> None:
        self.metrics.running = 0  # before the batch empties: num_running() == 0 implies the gauge reads 0
        self._running = []
        if self._kv is not None:
            self._kv.clear()
        self._positions = self._last = None

    # --- sampling and output --------------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """Next token of every row of logits [B, V] (changed in place): the repetition penalty and min_tokens for
        all rows at once, one argmax for the greedy rows, then each sampling row through its filters and its own
        generator. One host sync for the greedy rows, one per sampling row."""
        self._penalize(logits, requests)
        tokens = [0] * len(requests)
        greedy = [i for i, r in enumerate(requests) if r.params.greedy]
        if greedy:
            rows = logits if len(greedy) == len(requests) else logits[greedy]
            for i, token in zip(greedy, rows.argmax(-1).tolist()):
                tokens[i] = token
        for i, request in enumerate(requests):
            if not request.params.greedy:
                scores = self._filter(logits[i], request.params)
                tokens[i] = int(torch.multinomial(scores.softmax(-1), 1, generator=request.generator))
        return tokens

    def _penalize(self, logits: torch.Tensor, requests: list[Request]) -> None:
        """Repetition penalty (as transformers applies it: positive scores divided, negative multiplied, over each
        row's distinct prompt and generated ids) and the min_tokens ban on end-of-turn tokens, in place."""
        by_penalty: dict[float, list[int]] = {}
        for i, request in enumerate(requests):
            if request.params.repetition_penalty != 1.0:
                by_penalty.setdefault(request.params.repetition_penalty, []).append(i)
        for penalty, rows in by_penalty.items():  # a Python float, as transformers: the same rounding
            seen = [requests[i].seen for i in rows]
            row_index = torch.repeat_interleave(torch.tensor(rows, device=logits.device),
                                                torch.tensor([len(s) for s in seen], device=logits.device))
            ids = torch.cat(seen)
            picked = logits[row_index, ids]
            logits[row_index, ids] = torch.where(picked < 0, picked * penalty, picked / penalty)
        early = [i for i, r in enumerate(requests) if len(r.generated) < r.params.min_tokens]
        if early:
            logits[torch.tensor(early, device=logits.device)[:, None],
                   torch.tensor(self.eos_ids, device=logits.device)[None, :]] = float("-inf")

    def warp(self, scores: torch.Tensor, request: Request) -> torch.Tensor:
        """One row's next-token scores [V] after the repetition penalty, min_tokens and (sampling only)
        temperature, top-k and top-p, in transformers' order. Greedy stops after the penalty."""
        scores = scores.clone()[None]
        self._penalize(scores, [request])
        return scores[0] if request.params.greedy else self._filter(scores[0], request.params)

    @staticmethod
    def _filter(scores: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        """Temperature, top-k and top-p of one row, in transformers' order."""
        scores = scores / p.temperature
        if p.top_k and p.top_k > 0:
            k = min(p.top_k, scores.shape[-1])
            scores = scores.masked_fill(scores < torch.topk(scores, k)[0][-1], float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            remove = sorted_scores.softmax(-1).cumsum(-1) <= (1 - p.top_p)
            remove[-1] = False  # keep at least one token
            scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
        return scores

    def _accept(self, requests: list[Request], tokens: list[int], offset: int) -> None:
        now = time.monotonic()
        self._last[offset:offset + len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=self.device)
        for request, token in zip(requests, tokens):
            if request.finished:
                continue
            p = request.params
            request.generated.append(token)
            if request.first_token_at is None:
                request.first_token_at = now
                self.metrics.observe_ttft(now - request.arrival)
            self.metrics.generation_tokens += 1
            if token not in request.seen_ids:
                request.seen_ids.add(token)
                request.seen = torch.cat([request.seen, request.seen.new_tensor([token])])
            is_eos = token in self.eos_ids
            reason = None
            if is_eos and not p.ignore_eos:
                reason = "stop"
            else:
                if not is_eos:
                    request.text_ids.append(token)
                if len(request.generated) >= p.max_tokens or len(request.prompt) + len(request.generated) >= \
                        self.max_model_len:
                    reason = "length"
            try:
                reason = self._emit(request, reason)
            except Exception as exc:  # detokenising one row's ids must not take the batch down
                log.exception("detokenisation failed")
                self._fail(request, f"could not decode the generated text ({type(exc).__name__})")
                continue
            if reason is not None:
                self._finish(request, reason)

    def _emit(self, request: Request, reason: str | None) -> str | None:
        """Send the new text; a stop string ends the request (its text cut before the stop string)."""
        text = self.processor.decode(request.text_ids)
        stops = request.params.stop
        if stops:
            begin = max(0, len(request.sent) - max(len(s) for s in stops))
            cut = min((i for i in (text.find(s, begin) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        if reason is None:
            if text.endswith("\ufffd"):
                return None  # an incomplete UTF-8 sequence: wait for the rest
            if stops:  # hold back what could be the start of a stop string
                hold = max(len(s) for s in stops) - 1
                text = text[:max(len(request.sent), len(text) - hold)]
        if len(text) > len(request.sent) and text.startswith(request.sent):
            request.sink(Event("delta", text=text[len(request.sent):]))
            request.sent = text
        elif len(request.generated) == 1 and reason is None:
            # a first token with no text yet (a partial character, a token that decodes to nothing): an empty
            # delta still tells the HTTP layer that generation started, so a stream's first chunk marks it
            request.sink(Event("delta", text=""))
        return reason

    def _finish(self, request: Request, reason: str | None) -> None:
        """reason None: cancelled (nobody listens any more)."""
        if request.finished:
            return
        request.finished = True
        now = time.monotonic()
        if reason is None:
            self.metrics.requests_cancelled += 1
            return
        self.metrics.prompt_tokens += len(request.prompt)
        self.metrics.observe_latency(now - request.arrival)
        self.metrics.count_finished(reason)
        request.sink(Event("done", finish_reason=reason, completion_tokens=len(request.generated)))

    def _fail(self, request: Request, message: str, code: str = "engine_error") -> None:
        if request.finished:
            return
        request.finished = True
        self.metrics.count_finished({"queue_timeout": "timeout", "shutdown": "shutdown"}.get(code, "error"))
        try:
            request.sink(Event("error", message=message, code=code))
        except Exception:  # a sink that cannot take the error has nobody to tell
            log.exception("could not deliver an error")

