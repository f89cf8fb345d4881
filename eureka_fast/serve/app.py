"""The OpenAI-compatible HTTP layer (Starlette): chat completions, transcriptions, models, health, metrics."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
import zlib
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.concurrency import run_in_threadpool

from .audio_input import AudioInputError, AudioPolicy
from .engine import Engine, EngineStopped, Event, QueueFull, SamplingParams
from .protocol import APIError, bad, check_model, parse_chat, sampling_params

log = logging.getLogger("eureka_fast.serve")

TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
MAX_TRANSCRIPTION_PROMPT_TOKENS = 224  # Whisper's limit on its prompt
TRANSCRIPTION_CONTEXT = "Context (the text before this audio, or names and terms it may contain): "
_POLL_S = 0.25  # how often a waiting handler checks whether its client is still there


@dataclass
class ServeOptions:
    served_model_name: str = "eureka-audio"
    api_key: str | None = None
    max_audio_seconds: float = 600.0
    max_body_mb: float = 64.0
    allow_local_audio: str | None = None
    allow_remote_audio: bool = False
    remote_audio_timeout_s: float = 30.0
    retry_after_s: int = 1

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class BodyLimit:
    """ASGI middleware: a request body over the limit gets 413 before the app sees it (by Content-Length when
    given, else while it is read)."""

    def __init__(self, app, max_bytes: int, metrics):
        self.app, self.max_bytes, self.metrics = app, int(max_bytes), metrics

    async def _refuse(self, send, message: str, status: int = 413):
        self.metrics.count_rejected(status)
        err = APIError(status, message, param=None, code="request_too_large" if status == 413 else "invalid_value")
        body = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit_mb = f"{self.max_bytes / (1 << 20):g} MiB (--max-body-mb)"
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return await self._refuse(send, "the Content-Length header is not a number", 400)
                if length > self.max_bytes:
                    return await self._refuse(send, f"the request body ({length} bytes) is larger than {limit_mb}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._refuse(send, f"the request body is larger than {limit_mb}")
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class Server:
    """Handlers bound to one engine and its options."""

    def __init__(self, engine: Engine, options: ServeOptions):
        self.engine = engine
        self.options = options
        self.policy = AudioPolicy(max_seconds=options.max_audio_seconds, max_bytes=options.max_body_bytes,
                                  local_dir=options.allow_local_audio, allow_remote=options.allow_remote_audio,
                                  remote_timeout_s=options.remote_audio_timeout_s)
        self.names = (options.served_model_name,)
        self.created = int(time.time())

    # --- plumbing -------------------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        key = self.options.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    async def _json(self, request: Request):
        raw = await request.body()
        if not raw:
            raise bad("the request body is empty; send a JSON object", None, "invalid_json")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"the request body is not valid JSON ({str(exc)[:120]})", None, "invalid_json") from None

    def _resolve_audio(self, messages: list) -> list:
        """Audio parts -> {"type": "audio", "audio": samples} (decoded and checked against the limits)."""
        out = []
        for i, message in enumerate(messages):
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    param = f"messages[{i}].content[{j}]"
                    if part["type"] == "input_audio":
                        parts.append({"type": "audio", "audio": self.policy.input_audio(part["input_audio"],
                                                                                         param + ".input_audio")})
                    elif part["type"] == "audio_url":
                        parts.append({"type": "audio", "audio": self.policy.audio_url(part["audio_url"],
                                                                                       param + ".audio_url")})
                    else:  # text, or audio already decoded (transcriptions)
                        parts.append(part)
                content = parts
            out.append({"role": message["role"], "content": content})
        return out

    def _prepare(self, messages: list, params: SamplingParams, max_tokens_given: bool):
        from ..models.processing_eureka import MessageFormatError

        try:
            prompt = self.engine.prepare(self._resolve_audio(messages))
        except AudioInputError as exc:
            raise bad(str(exc), exc.param, exc.code) from None
        except MessageFormatError as exc:
            raise bad(str(exc), "messages") from None
        limit = self.engine.max_model_len
        if len(prompt) + 1 > limit:
            raise bad(f"the prompt is {len(prompt)} tokens (audio included) but this model's context is {limit} "
                      f"tokens", "messages", "context_length_exceeded")
        if len(prompt) + params.max_tokens > limit:
            if max_tokens_given:
                raise bad(f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds this "
                          f"model's context of {limit} tokens", "max_tokens", "context_length_exceeded")
            params.max_tokens = limit - len(prompt)
        return prompt

    def _submit(self, prompt, params_list, loop, q: asyncio.Queue, request_id: str):
        def sink_for(index):
            def sink(event: Event):
                try:
                    loop.call_soon_threadsafe(q.put_nowait, (index, event))
                except RuntimeError:  # the event loop is gone (server stopped): nobody to tell
                    pass
            return sink

        try:
            return self.engine.submit_many(prompt, params_list, [sink_for(i) for i in range(len(params_list))],
                                           request_id)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}; retry later", type="rate_limit_exceeded",
                           code="queue_full", headers={"Retry-After": str(self.options.retry_after_s)}) from None
        except EngineStopped as exc:
            raise APIError(503, str(exc), type="server_error", code="shutting_down") from None

    def _engine_error(self, event: Event) -> APIError:
        if event.code == "queue_timeout":
            return APIError(503, event.message, type="server_error", code="queue_timeout",
                            headers={"Retry-After": str(self.options.retry_after_s)})
        if event.code == "shutdown":
            return APIError(503, event.message, type="server_error", code="shutting_down")
        return APIError(500, event.message, type="server_error", code="engine_error")

    async def _next(self, q: asyncio.Queue, request: Request, requests) -> tuple[int, Event] | None:
        """The next engine event; None (and the requests cancelled) if the client went away."""
        while True:
            try:
                return await asyncio.wait_for(q.get(), _POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    for r in requests:
                        self.engine.cancel(r)
                    return None

    # --- endpoints ------------------------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        self._auth(request)
        body = await self._json(request)
        chat = parse_chat(body, self.names, self.engine.max_model_len)
        prompt = await run_in_threadpool(self._prepare, chat.messages, chat.params, chat.max_tokens_given)
        params_list = []
        for i in range(chat.n):
            p = SamplingParams(**vars(chat.params))
            if p.seed is not None and i:
                p.seed = (p.seed + i) & ((1 << 64) - 1)  # n samples of one seeded request differ, reproducibly
            params_list.append(p)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        requests = self._submit(prompt, params_list, loop, q, rid)
        created = int(time.time())
        model = body.get("model") or self.options.served_model_name
        if chat.stream:
            return await self._stream(request, q, requests, rid, created, model, len(prompt), chat.include_usage)
        texts = [[] for _ in requests]
        finish: list = [None] * len(requests)
        tokens = [0] * len(requests)
        remaining = len(requests)
        while remaining:
            got = await self._next(q, request, requests)
            if got is None:
                return Response(status_code=499)
            index, event = got
            if event.kind == "delta":
                texts[index].append(event.text)
            elif event.kind == "done":
                finish[index], tokens[index] = event.finish_reason, event.completion_tokens
                remaining -= 1
            else:
                for r in requests:
                    self.engine.cancel(r)
                raise self._engine_error(event)
        completion = sum(tokens)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
                         "logprobs": None, "finish_reason": finish[i]} for i in range(len(requests))],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                      "total_tokens": len(prompt) + completion},
        })

    async def _stream(self, request, q, requests, rid, created, model, prompt_tokens, include_usage):
        # Wait for the first event before answering, so that a queue timeout or an engine error still gets its
        # HTTP status; after that, errors travel inside the stream.
        first = await self._next(q, request, requests)
        if first is None:
            return Response(status_code=499)
        if first[1].kind == "error":
            for r in requests:
                self.engine.cancel(r)
            raise self._engine_error(first[1])

        def chunk(choices, usage=False, totals=None):
            obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": choices}
            if include_usage:
                obj["usage"] = totals if usage else None
            return f"data: {json.dumps(obj)}\n\n"

        async def events():
            remaining = len(requests)
            completion = 0
            pending = [first]
            try:
                for i in range(len(requests)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                while remaining:
                    index, event = pending.pop() if pending else await q.get()
                    if event.kind == "delta":
                        if not event.text:  # the first token without text: the role chunk above announced it
                            continue
                        yield chunk([{"index": index, "delta": {"content": event.text}, "logprobs": None,
                                      "finish_reason": None}])
                    elif event.kind == "done":
                        remaining -= 1
                        completion += event.completion_tokens
                        yield chunk([{"index": index, "delta": {}, "logprobs": None,
                                      "finish_reason": event.finish_reason}])
                    else:
                        err = self._engine_error(event)
                        yield f"data: {json.dumps(err.body())}\n\n"
                        break
                if include_usage and not remaining:
                    yield chunk([], usage=True, totals={"prompt_tokens": prompt_tokens,
                                                        "completion_tokens": completion,
                                                        "total_tokens": prompt_tokens + completion})
                yield "data: [DONE]\n\n"
            finally:  # the client closed the stream, or it ended: nothing may keep a slot
                for r in requests:
                    self.engine.cancel(r)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def transcriptions(self, request: Request) -> Response:
        self._auth(request)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise bad("send the audio as multipart/form-data with a 'file' field", "file", "invalid_type")
        try:
            form = await request.form(max_files=1, max_fields=32)
        except Exception as exc:  # malformed multipart bodies raise parser-specific errors
            raise bad(f"the multipart body could not be parsed ({type(exc).__name__})", "file") from None
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise bad("'file' (the audio file) is required", "file", "missing_required_parameter")
            data = await upload.read()
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
        finally:
            await form.close()
        check_model(fields, self.names)
        context = fields.get("prompt", "").strip()
        fmt = fields.get("response_format", "json")
        if fmt not in TRANSCRIPTION_FORMATS:
            raise bad(f"'response_format' must be one of {', '.join(TRANSCRIPTION_FORMATS)}; got {fmt[:40]!r}",
                      "response_format")
        body = {}
        for name in ("temperature",):
            if name in fields:
                try:
                    body[name] = float(fields[name])
                except ValueError:
                    raise bad(f"'{name}' must be a number", name, "invalid_type") from None
        params, _ = sampling_params(body, self.engine.max_model_len, temperature_default=0.0)

        def prepare():
            if context and len(self.engine.processor.tokenizer.encode(context)) > MAX_TRANSCRIPTION_PROMPT_TOKENS:
                raise bad(f"'prompt' is longer than {MAX_TRANSCRIPTION_PROMPT_TOKENS} tokens (as Whisper, this "
                          f"server takes at most {MAX_TRANSCRIPTION_PROMPT_TOKENS})", "prompt")
            try:
                samples = self.policy.decode(data, "uploaded file", "file")
            except AudioInputError as exc:
                raise bad(str(exc), exc.param, exc.code) from None
            prompt = self._prepare(transcription_messages(samples, context), params, False)
            return prompt, len(samples) / 16000

        prompt, duration = await run_in_threadpool(prepare)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        requests = self._submit(prompt, [params], loop, q, f"trsc-{uuid.uuid4().hex}")
        text = []
        while True:
            got = await self._next(q, request, requests)
            if got is None:
                return Response(status_code=499)
            event = got[1]
            if event.kind == "delta":
                text.append(event.text)
            elif event.kind == "done":
                break
            else:
                raise self._engine_error(event)
        return _transcription_response("".join(text).strip(), fmt, duration, params.temperature)

    async def models(self, request: Request) -> Response:
        self._auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "eureka_fast",
             "max_model_len": self.engine.max_model_len} for name in self.names]})

    async def health(self, request: Request) -> Response:
        if not self.engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(self.engine.metrics.render(), media_type="text/plain; version=0.0.4")


def transcription_messages(samples, context: str = "") -> list:
    """The conversation a transcription request asks: the official ASR prompt for the audio, and when the request
    has a ``prompt`` (in Whisper's API: the text that came before this audio, or the spelling of names and terms),
    that text as context at the end of the system turn. The model reads it as part of its instruction (Whisper
    reads it as earlier decoder text); the answer is the model's text alone, the context is not prepended."""
    from ..inference import task_messages

    messages = task_messages("asr", samples)
    if context:
        messages[0]["content"] = f"{messages[0]['content']}\n{TRANSCRIPTION_CONTEXT}{context}"
    return messages


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, rest = divmod(ms, 3600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _transcription_response(text: str, fmt: str, duration: float, temperature: float) -> Response:
    # The model gives no timestamps: the subtitle formats hold one cue spanning the whole audio.
    if fmt == "json":
        return JSONResponse({"text": text})
    if fmt == "text":
        return PlainTextResponse(text + "\n")
    if fmt == "srt":
        return PlainTextResponse(f"1\n{_timestamp(0, ',')} --> {_timestamp(duration, ',')}\n{text}\n\n",
                                 media_type="application/x-subrip")
    if fmt == "vtt":
        return PlainTextResponse(f"WEBVTT\n\n{_timestamp(0, '.')} --> {_timestamp(duration, '.')}\n{text}\n\n",
                                 media_type="text/vtt")
    raw = text.encode()
    ratio = len(raw) / max(1, len(zlib.compress(raw))) if raw else 0.0
    return JSONResponse({"task": "transcribe", "language": "unknown", "duration": round(duration, 3), "text": text,
                         "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": round(duration, 3), "text": text,
                                       "tokens": [], "temperature": temperature, "avg_logprob": 0.0,
                                       "compression_ratio": ratio, "no_speech_prob": 0.0}]})


def create_app(engine: Engine, options: ServeOptions | None = None, *, manage_engine: bool = True) -> Starlette:
    """The ASGI app. manage_engine: start the engine with the app and stop it (failing what is left) on shutdown."""
    options = options or ServeOptions()
    server = Server(engine, options)
    metrics = engine.metrics

    async def on_api_error(request, exc: APIError):
        metrics.count_rejected(exc.status)
        return error_response(exc)

    async def on_http_error(request, exc: HTTPException):
        metrics.count_rejected(exc.status_code)
        messages = {404: f"no route {request.method} {request.url.path}",
                    405: f"method {request.method} is not allowed on {request.url.path}"}
        return error_response(APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                                       code="not_found" if exc.status_code == 404 else None))

    async def on_crash(request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        metrics.count_rejected(500)
        return error_response(APIError(500, "internal server error", type="server_error", code="internal_error"))

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await run_in_threadpool(engine.stop)

    routes = [
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/audio/transcriptions", server.transcriptions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_crash})
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes, metrics=metrics)
    app.state.server = server
    return app
