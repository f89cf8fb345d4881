"""A small OpenAI-compatible chat-completions server for DataFlux tests (127.0.0.1, real sockets).

Its "models" are deterministic functions of the request (same request -> same reply), so runs are reproducible:
  mock-captioner      decodes the base64 WAV input_audio and captions its duration (400 if the audio is bad)
  mock-generator      writes N distinct 4-option questions (N parsed from the prompt), fresh words per round
  mock-answerer-a/b   pick a letter from a hash of the question; B disagrees with A on about a quarter
  mock-judge          TIE when both agree; on disagreement keeps MODEL_A or discards, by hash
Faults are injected by request number (global counter): every `every_500`-th -> HTTP 500, every `every_timeout`-th ->
reply only after `delay_s`, every `every_malformed`-th -> a 200 whose content violates the format, every
`every_reset`-th -> connection closed without a reply. `injected` counts what was injected, per kind.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import threading
from collections import Counter

WORDS = ("amber basil cedar delta ember fjord garnet harbor indigo juniper kestrel lagoon meadow nectar orchid "
         "pebble quartz raven saffron tundra umber violet willow xenon yarrow zephyr anchor beacon canyon dune "
         "falcon glacier hollow island jasper kelp lantern mesa nimbus oasis prairie quiver ridge summit thicket "
         "upland valley wharf").split()


def _h(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest(), 16)


class MockOpenAIServer:
    def __init__(self, every_500=0, every_timeout=0, every_malformed=0, every_reset=0, delay_s=1.5):
        self.every = {"http_500": every_500, "timeout": every_timeout, "malformed": every_malformed,
                      "reset": every_reset}
        self.delay_s = delay_s
        self.injected = Counter()
        self.requests = Counter()
        self._n = 0
        self._lock = threading.Lock()
        self.port = None
        self._loop = None
        self._thread = None
        self._ready = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self):
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("mock server did not start")
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    def _serve(self):
        from aiohttp import web

        async def main():
            self._stop = asyncio.Event()
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_post("/v1/chat/completions", self._handle)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())

    # ------------------------------------------------------------------ requests
    def _fault(self):
        with self._lock:
            self._n += 1
            n = self._n
        for kind, every in self.every.items():
            if every and n % every == 0:
                with self._lock:
                    self.injected[kind] += 1
                return kind
        return None

    async def _handle(self, request):
        from aiohttp import web

        body = await request.json()
        model = body.get("model", "")
        with self._lock:
            self.requests[model] += 1
        fault = self._fault()
        if fault == "http_500":
            return web.Response(status=500, text="injected internal error")
        if fault == "reset":
            request.transport.close()  # drop the connection without a reply
            await asyncio.sleep(0.05)
            return web.Response(status=500, text="unreachable")
        if fault == "timeout":
            await asyncio.sleep(self.delay_s)
        try:
            content = self._reply(model, body["messages"], malformed=(fault == "malformed"))
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        return web.json_response({"id": "mock", "object": "chat.completion", "model": model,
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": content}}]})

    def _reply(self, model, messages, malformed):
        text = "\n".join(_texts(messages))
        if model == "mock-captioner":
            audio = _audio(messages)
            if malformed:
                return '{"caption": '
            return json.dumps({"caption": f"Speech lasting {audio:.2f} seconds."})
        if model == "mock-generator":
            if malformed:
                return json.dumps({"is_success": True, "questions": ["only one question, no options"]})
            n = int(re.search(r"write exactly (\d+) distinct", text).group(1))
            kept = len(re.findall(r"^- ", text.split("do not repeat them):")[-1], flags=re.M)) if \
                "do not repeat them" in text else 0
            feedback = text.count("discarded:") + text.count("failed")
            cap = re.search(r"Ground-truth caption of the clip[^:]*: (.*)", text).group(1)
            qs = []
            for k in range(n):
                h = _h(cap, kept, feedback, k)
                w = [WORDS[(h >> (6 * j)) % len(WORDS)] for j in range(4)]
                qs.append(f"Which {w[0]} {w[1]} {w[2]} {w[3]} number {kept + feedback}-{k}?\n"
                          "A. first\nB. second\nC. third\nD. fourth")
            return json.dumps({"is_success": True, "questions": qs})
        if model in ("mock-answerer-a", "mock-answerer-b"):
            if malformed:
                return "I think it is B."
            q = _texts(messages)[-1]
            a = "ABCD"[_h(q, "a") % 4]
            letter = a
            if model == "mock-answerer-b" and _h(q, "b") % 4 == 0:
                letter = "ABCD"[("ABCD".index(a) + 1) % 4]
            return f"<THINK>Listening closely, option {letter} fits best.</THINK><RESPONSE>{letter}</RESPONSE>"
        if model == "mock-judge":
            if malformed:
                return json.dumps({"consensus": "yes", "winner": "MODEL_A"})
            la, lb = re.findall(r"<RESPONSE>([A-D])</RESPONSE>", text)[:2] + [None, None][: max(0, 2 - len(
                re.findall(r"<RESPONSE>([A-D])</RESPONSE>", text)))]
            q = text.split("Question:\n", 1)[-1].split("\n\nModel A:", 1)[0]
            if la is not None and la == lb:
                v = dict(consensus=True, consistency_with_caption="STRONG_MATCH", winner="TIE",
                         final_action="KEEP_USING_WINNER")
            elif _h(q, "judge") % 2 == 0 and la is not None:
                v = dict(consensus=False, consistency_with_caption="WEAK_MATCH", winner="MODEL_A",
                         final_action="KEEP_USING_WINNER")
            else:
                v = dict(consensus=False, consistency_with_caption="CONFLICT", winner="NONE", final_action="DISCARD")
            v["reasoning"] = "mock judgement"
            return json.dumps(v)
        raise ValueError(f"unknown model {model!r}")


def _texts(messages):
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            out.append(c)
        else:
            out += [p["text"] for p in c if p.get("type") == "text"]
    return out


def _audio(messages) -> float:
    import soundfile as sf

    for m in messages:
        if isinstance(m.get("content"), list):
            for p in m["content"]:
                if p.get("type") == "input_audio":
                    try:
                        data, sr = sf.read(io.BytesIO(base64.b64decode(p["input_audio"]["data"])))
                    except Exception as exc:
                        raise ValueError(f"bad input_audio: {exc}") from None
                    return len(data) / sr
    raise ValueError("no input_audio in request")


def http_roles(base_url, timeout_s=0.5, max_retries=3, backoff_s=0.01):
    common = dict(backend="openai", base_url=base_url, timeout_s=timeout_s, max_retries=max_retries,
                  backoff_s=backoff_s, concurrency=4)
    return {"captioner": dict(common, model="mock-captioner", builtin_facts=False),
            "query_generator": dict(common, model="mock-generator"),
            "answerer_a": dict(common, model="mock-answerer-a"),
            "answerer_b": dict(common, model="mock-answerer-b"),
            "judge": dict(common, model="mock-judge")}
