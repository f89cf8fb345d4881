"""The continuous-batching engine against EurekaAudio.generate (the reference), alone and batched."""
import queue
import threading
import time

import pytest
import torch

from eureka_fast.inference import EurekaAudio
from eureka_fast.serve import Engine, Event, QueueFull, SamplingParams

from serve_helpers import noise

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = dict(temperature=0.0, top_p=1.0, top_k=0)


def conversations(count=16):
    """Conversations of different lengths: audio of 0.2 .. 7 s with a question, and text-only ones."""
    out = []
    for i in range(count):
        if i % 3 == 2:
            out.append([{"role": "system", "content": "Be brief."} if i % 2 else
                        {"role": "system", "content": "You answer questions."},
                        {"role": "user", "content": "word " * (i + 1) + "what now?"}])
        else:
            out.append([{"role": "user", "content": [{"type": "audio", "audio": noise(0.2 + 0.45 * i, seed=i)},
                                                     {"type": "text", "text": "What is this?" + " q" * i}]}])
    return out


@pytest.fixture(scope="module")
def reference(model_and_processor):
    model, processor = model_and_processor
    return EurekaAudio(model, processor)


@pytest.fixture
def engine(model_and_processor):
    model, processor = model_and_processor
    eng = Engine(model, processor, max_num_seqs=16).start()
    yield eng
    eng.stop()


def wait_idle(engine, timeout=10.0) -> bool:
    """The engine frees finished rows right after their last event: poll (bounded) until none runs."""
    deadline = time.monotonic() + timeout
    while (engine.num_running() or engine.num_waiting()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.num_running() == 0 and engine.num_waiting() == 0


class Collector:
    """A request's sink that records its events."""

    def __init__(self):
        self.events = queue.Queue()
        self.text = []
        self.first = threading.Event()

    def __call__(self, event: Event):
        if event.kind == "delta":
            self.text.append(event.text)
        self.first.set()
        self.events.put(event)

    def wait_done(self, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if event.kind != "delta":
                return event


def test_greedy_matches_generate_alone_and_batched_with_15_others(engine, reference):
    convs = conversations(16)
    max_tokens = [6 + 3 * (i % 5) for i in range(16)]
    expected = [reference.generate(c, greedy=True, max_new_tokens=m) for c, m in zip(convs, max_tokens)]
    assert len(set(expected)) == 16 and all(len(e) > 10 for e in expected)  # varied answers: the test can fail

    prompts = [engine.prepare(c) for c in convs]
    assert len({len(p) for p in prompts}) > 8  # different prompt lengths

    # alone
    text, reason, count = engine.generate(prompts[4], SamplingParams(max_tokens=max_tokens[4], **GREEDY))
    assert (text, reason, count) == (expected[4], "length", max_tokens[4])

    # batched: 8 start together, 8 more join while those decode (different lengths on both sides of the merge)
    sinks = [Collector() for _ in range(16)]
    for i in range(8):
        engine.submit(prompts[i], SamplingParams(max_tokens=max_tokens[i], **GREEDY), sinks[i])
    assert sinks[0].first.wait(60)
    for i in range(8, 16):
        engine.submit(prompts[i], SamplingParams(max_tokens=max_tokens[i], **GREEDY), sinks[i])
    done = [s.wait_done() for s in sinks]
    assert [d.kind for d in done] == ["done"] * 16
    assert ["".join(s.text) for s in sinks] == expected
    assert [d.completion_tokens for d in done] == max_tokens
    assert wait_idle(engine) and engine.metrics.running == 0


def test_default_greedy_keeps_the_official_repetition_penalty(engine, reference):
    conv = conversations(2)[1]
    prompt = engine.prepare(conv)
    with_penalty = engine.generate(prompt, SamplingParams(max_tokens=24, **GREEDY))[0]
    without = engine.generate(prompt, SamplingParams(max_tokens=24, repetition_penalty=1.0, **GREEDY))[0]
    assert with_penalty == reference.generate(conv, greedy=True, max_new_tokens=24)
    assert without == reference.generate(conv, greedy=True, max_new_tokens=24, repetition_penalty=1.0)


def test_defaults_are_the_official_decoding_defaults_and_no_caller_can_change_them():
    from eureka_fast.inference import OFFICIAL_DECODING
    from eureka_fast.serve.protocol import sampling_params

    params = SamplingParams()
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty, params.max_tokens) == (
        OFFICIAL_DECODING["temperature"], OFFICIAL_DECODING["top_p"], OFFICIAL_DECODING["top_k"],
        OFFICIAL_DECODING["repetition_penalty"], OFFICIAL_DECODING["max_new_tokens"]) == (0.7, 0.8, 20, 1.05, 512)
    # an HTTP request without sampling fields gets the same; temperature 0 keeps the penalty (the official CLI)
    assert sampling_params({}, 32768)[0] == params
    greedy = sampling_params({"temperature": 0}, 32768)[0]
    assert (greedy.top_p, greedy.top_k, greedy.repetition_penalty) == (1.0, 0, 1.05)
    # one shared mapping: a caller that edits it in place would change every later generate() in the process
    with pytest.raises(TypeError):
        OFFICIAL_DECODING["repetition_penalty"] = 1.0
    with pytest.raises((TypeError, AttributeError)):
        OFFICIAL_DECODING.pop("do_sample")


def test_seeded_sampling_is_reproducible_and_matches_its_distribution(engine):
    prompt = engine.prepare(conversations(1)[0])
    params = SamplingParams(max_tokens=12, seed=1234, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    first = engine.generate(prompt, params)[0]
    assert engine.generate(prompt, params)[0] == first
    others = {engine.generate(prompt, SamplingParams(**{**vars(params), "seed": s}))[0] for s in range(5)}
    assert len(others) > 1  # the seed matters
    # top_k=1 samples the argmax: the same text as greedy without a repetition penalty
    top1 = SamplingParams(max_tokens=12, seed=5, temperature=0.9, top_k=1, repetition_penalty=1.0)
    assert engine.generate(prompt, top1)[0] == engine.generate(
        prompt, SamplingParams(max_tokens=12, repetition_penalty=1.0, **GREEDY))[0]


def test_sampling_filters_follow_transformers(model_and_processor):
    """temperature / top-k / top-p / repetition penalty against transformers' own logits processors."""
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    model, processor = model_and_processor
    eng = Engine(model, processor)
    torch.manual_seed(0)
    logits = torch.randn(1, 300)
    seen = torch.tensor([[5, 9, 9, 17, 250]])
    request = type("R", (), {})()
    request.seen = torch.tensor([5, 9, 17, 250])
    request.generated = []
    for temperature, top_k, top_p, penalty in ((0.7, 40, 0.8, 1.3), (1.3, 0, 0.95, 1.05), (0.5, 7, 1.0, 0.9)):
        ref = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
        for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None,
                       TopPLogitsWarper(top_p) if top_p < 1 else None):
            ref = warper(seen, ref) if warper is not None else ref
        request.params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
        ours = eng.warp(logits[0].clone(), request)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref[0]))
        assert 3 < int(torch.isfinite(ours).sum()) < 300  # the filters did something, and left a choice
        torch.testing.assert_close(ours[torch.isfinite(ours)], ref[0][torch.isfinite(ref[0])])
    # samples come only from the kept tokens
    request.params = SamplingParams(temperature=0.7, top_k=40, top_p=0.8, repetition_penalty=1.3)
    allowed = set(torch.isfinite(eng.warp(logits[0].clone(), request)).nonzero().flatten().tolist())
    picks = set()
    for seed in range(200):
        request.generator = torch.Generator().manual_seed(seed)
        picks.add(eng._sample(logits.clone(), [request])[0])
    assert picks <= allowed and len(picks) > 2
    # min_tokens: the end-of-turn tokens cannot be picked before it
    request.params = SamplingParams(temperature=0.0, repetition_penalty=1.0, min_tokens=2)
    eos_logits = torch.zeros(1, processor.tokenizer.vocab_size + 10)
    eos_logits[0, eng.eos_ids[0]] = 10.0
    assert eng._sample(eos_logits.clone(), [request])[0] != eng.eos_ids[0]
    request.generated = [1, 2]
    assert eng._sample(eos_logits.clone(), [request])[0] == eng.eos_ids[0]


def test_stop_string_cuts_the_text(engine):
    prompt = engine.prepare(conversations(1)[0])
    full = engine.generate(prompt, SamplingParams(max_tokens=20, **GREEDY))[0]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip()
    text, reason, _ = engine.generate(prompt, SamplingParams(max_tokens=20, stop=(stop,), **GREEDY))
    assert reason == "stop" and text == full[:full.index(stop)]


def test_cancel_frees_the_slot_at_once(engine):
    prompt = engine.prepare(conversations(1)[0])
    sink = Collector()
    request = engine.submit(prompt, SamplingParams(max_tokens=400, ignore_eos=True, **GREEDY), sink)
    assert sink.first.wait(60)
    assert engine.num_running() == 1
    engine.cancel(request)
    assert wait_idle(engine) and engine.metrics.requests_cancelled >= 1
    # the engine goes on serving
    assert engine.generate(prompt, SamplingParams(max_tokens=3, **GREEDY))[1] == "length"


def test_an_engine_error_fails_only_its_request(engine, reference):
    convs = conversations(3)
    prompts = [engine.prepare(c) for c in convs]
    broken = engine.prepare(convs[0])
    broken.input_features = broken.input_features[:, :40]  # wrong mel bins: the audio encoder refuses it
    sinks = [Collector() for _ in range(4)]
    engine.submit(broken, SamplingParams(max_tokens=5, **GREEDY), sinks[3])
    for i in range(3):
        engine.submit(prompts[i], SamplingParams(max_tokens=5, **GREEDY), sinks[i])
    done = [s.wait_done() for s in sinks]
    assert done[3].kind == "error" and "failed" in done[3].message and "Traceback" not in done[3].message
    assert [d.kind for d in done[:3]] == ["done"] * 3
    assert ["".join(s.text) for s in sinks[:3]] == [reference.generate(c, greedy=True, max_new_tokens=5)
                                                   for c in convs]
    assert wait_idle(engine)


def test_queue_limit_and_queue_timeout(model_and_processor):
    model, processor = model_and_processor
    eng = Engine(model, processor, max_num_seqs=1, max_queue=1, queue_timeout_s=0.5).start()
    try:
        prompt = eng.prepare(conversations(1)[0])
        running = Collector()
        eng.submit(prompt, SamplingParams(max_tokens=100000 // 100, ignore_eos=True, **GREEDY), running)
        assert running.first.wait(60)
        waiting = Collector()
        eng.submit(prompt, SamplingParams(max_tokens=2, **GREEDY), waiting)
        with pytest.raises(QueueFull, match="max-queue 1"):
            eng.submit(prompt, SamplingParams(max_tokens=2, **GREEDY), Collector())
        event = waiting.wait_done(30)
        assert event.kind == "error" and event.code == "queue_timeout"
    finally:
        eng.stop()
    assert eng.num_running() == 0 and eng.num_waiting() == 0
    assert running.wait_done(10).code == "shutdown"  # stop() answers what was still running


def test_prompt_longer_than_the_context_is_refused(model_and_processor):
    model, processor = model_and_processor
    eng = Engine(model, processor, max_model_len=20).start()
    try:
        prompt = eng.prepare(conversations(1)[0])
        with pytest.raises(ValueError, match="context is 20 tokens"):
            eng.submit(prompt, SamplingParams(), Collector())
    finally:
        eng.stop()


@pytest.mark.parametrize("max_windows, expected_groups", [
    # one window per admission: the 3-window request goes alone (the queue's head always fits), and the
    # text-only requests ride along with the first audio one (no encoder work)
    (1, [["a1", "t1", "t2"], ["long"], ["a2"]]),
    # four windows: a1 and long fill the budget, a2 waits for the next admission
    (4, [["a1", "long", "t1", "t2"], ["a2"]]),
])
def test_admission_encodes_at_most_its_window_budget(model_and_processor, reference, max_windows, expected_groups):
    model, processor = model_and_processor
    eng = Engine(model, processor, max_num_seqs=16, max_prefill_windows=max_windows).start()
    groups = []
    forward = eng._forward_prefill

    def recording_forward(requests):
        groups.append([r.request_id for r in requests])
        return forward(requests)

    eng._forward_prefill = recording_forward
    audio = lambda seconds, seed: [{"role": "user", "content": [  # noqa: E731
        {"type": "audio", "audio": noise(seconds, seed=seed)}, {"type": "text", "text": "What is this?"}]}]
    convs = {"a1": audio(1.5, 1), "long": audio(75.0, 2), "t1": [{"role": "user", "content": "Say a word."}],
             "a2": audio(2.5, 3), "t2": [{"role": "user", "content": "Count with me."}]}
    prompts = {name: eng.prepare(conv) for name, conv in convs.items()}
    assert {name: p.windows for name, p in prompts.items()} == {"a1": 1, "long": 3, "t1": 0, "a2": 1, "t2": 0}
    sinks = {name: Collector() for name in convs}
    try:
        # queued while the scheduler cannot take the lock, so that it sees all five at once (the lock is
        # re-entrant: submit takes it again)
        with eng._cond:
            for name in convs:
                eng.submit(prompts[name], SamplingParams(max_tokens=6, **GREEDY), sinks[name], request_id=name)
        done = {name: sink.wait_done() for name, sink in sinks.items()}
    finally:
        eng.stop()
    assert groups == expected_groups
    assert all(d.kind == "done" for d in done.values())
    # the admission order does not change any answer
    assert {name: "".join(s.text) for name, s in sinks.items()} == {
        name: reference.generate(conv, greedy=True, max_new_tokens=6) for name, conv in convs.items()}
    assert eng.metrics.prefill.n == len(expected_groups) and eng.metrics.prefill_windows == 5
    assert eng.metrics.queue_wait.n == 5


@pytest.mark.parametrize("max_windows", [1, 4])
def test_long_audio_does_not_hold_back_the_first_token_of_a_short_request(model_and_processor, max_windows):
    """Queued together, a 1 s request and a 55 s one: with a one-window budget the short one's first token comes
    from its own prefill, before the long audio is encoded; with four windows both come from one admission."""
    model, processor = model_and_processor
    eng = Engine(model, processor, max_num_seqs=16, max_prefill_windows=max_windows).start()
    prompts = {"short": eng.prepare(conversations(1)[0]),
               "long": eng.prepare([{"role": "user", "content": [{"type": "audio", "audio": noise(55.0, seed=5)},
                                                                 {"type": "text", "text": "What is this?"}]}])}
    assert prompts["short"].windows == 1 and prompts["long"].windows == 2
    sinks = {name: Collector() for name in prompts}
    try:
        with eng._cond:  # both queued before the scheduler looks
            requests = {name: eng.submit(prompts[name], SamplingParams(max_tokens=4, ignore_eos=True, **GREEDY),
                                         sinks[name]) for name in prompts}
        assert all(s.wait_done().kind == "done" for s in sinks.values())
    finally:
        eng.stop()
    short, long = requests["short"].first_token_at, requests["long"].first_token_at
    if max_windows == 1:
        assert short < long and eng.metrics.prefill.n == 2
    else:
        assert short == long and eng.metrics.prefill.n == 1


def test_a_first_token_without_text_is_still_announced(model_and_processor):
    """A first token that decodes to no text gets an empty delta (a stream starts at the first token); later
    tokens without text send nothing."""
    from eureka_fast.serve.engine import Request

    model, processor = model_and_processor
    eng = Engine(model, processor)
    events = []
    request = Request(prompt=eng.prepare([{"role": "user", "content": "Hi."}]), params=SamplingParams(**GREEDY),
                      sink=events.append)
    request.generated = [eng.eos_ids[0]]  # an end-of-turn id with ignore_eos: no text
    assert eng._emit(request, None) is None
    assert [(e.kind, e.text) for e in events] == [("delta", "")]
    request.generated.append(eng.eos_ids[0])
    eng._emit(request, None)
    assert len(events) == 1
