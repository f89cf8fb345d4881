"""OpenAI-compatible chat-completions client (vLLM, SGLang, OpenAI, ...) for any DataFlux role.

Per role: base URL, model, API key from an environment variable, temperature, timeout, retries with exponential
backoff and jitter, and a concurrency limit. Retried: timeouts, HTTP 5xx and 429, connection errors/resets. Not
retried: other 4xx (a bad request stays bad). Every failed attempt is counted in the caller's `events` Counter
under "<role>.<kind>" (kinds: timeout, http_5xx, http_429, http_4xx, connection, bad_response), so a run can account
for every fault. aiohttp is imported lazily (optional dependency).
"""
from __future__ import annotations

import asyncio
import os
import random


class BackendError(RuntimeError):
    """A role's request failed for good (retries exhausted or not retryable). `kind` names the last failure."""

    def __init__(self, role: str, kind: str, message: str, attempts: int):
        super().__init__(f"{role}: {kind} after {attempts} attempt(s): {message}")
        self.role, self.kind, self.attempts = role, kind, attempts


class OpenAIChatClient:
    def __init__(self, role: str, base_url: str, model: str, api_key_env: str | None = None,
                 temperature: float = 0.0, timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 0.5,
                 concurrency: int = 8, max_tokens: int | None = 1024, json_mode: bool = False, **unknown):
        if unknown:
            raise ValueError(f"role {role}: unknown openai backend option(s) {sorted(unknown)}")
        if not base_url or not model:
            raise ValueError(f"role {role}: openai backend needs base_url and model")
        self.role, self.model = role, model
        self.url = base_url.rstrip("/") + ("/chat/completions" if not base_url.rstrip("/").endswith(
            "/chat/completions") else "")
        self.api_key_env = api_key_env
        if api_key_env and not os.environ.get(api_key_env):
            raise ValueError(f"role {role}: environment variable {api_key_env} (API key) is not set")
        self.temperature, self.timeout_s = float(temperature), float(timeout_s)
        self.max_retries, self.backoff_s = int(max_retries), float(backoff_s)
        self.concurrency, self.max_tokens, self.json_mode = int(concurrency), max_tokens, json_mode
        self._per_loop: dict = {}  # event loop -> (session, semaphore); a Ray task or a test may run its own loop

    @property
    def name(self) -> str:
        return f"openai:{self.model}@{self.url}"

    def _session(self):
        import aiohttp

        loop = asyncio.get_running_loop()
        entry = self._per_loop.get(loop)
        if entry is None or entry[0].closed:
            headers = {"Content-Type": "application/json"}
            if self.api_key_env:
                headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
            session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s))
            entry = (session, asyncio.Semaphore(self.concurrency))
            self._per_loop[loop] = entry
        return entry

    async def aclose(self):
        loop = asyncio.get_running_loop()
        entry = self._per_loop.pop(loop, None)
        if entry is not None:
            await entry[0].close()

    async def chat(self, messages: list, events=None, json_mode: bool | None = None) -> str:
        """The assistant message content of one chat completion, with retries. Raises BackendError."""
        import aiohttp

        body = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        if self.json_mode if json_mode is None else json_mode:
            body["response_format"] = {"type": "json_object"}
        session, sem = self._session()
        kind, message = "unknown", ""
        for attempt in range(1, self.max_retries + 2):
            retryable = True
            try:
                async with sem:
                    async with session.post(self.url, json=body) as resp:
                        text = await resp.text()
                        if resp.status == 200:
                            return _content(text)
                        kind = ("http_5xx" if resp.status >= 500 else "http_429" if resp.status == 429 else "http_4xx")
                        message = f"HTTP {resp.status}: {text[:200]}"
                        retryable = kind != "http_4xx"
            except asyncio.TimeoutError:
                kind, message = "timeout", f"no reply within {self.timeout_s:g} s"
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError) as exc:
                kind, message = "connection", f"{type(exc).__name__}: {exc}"
            except _BadResponse as exc:
                kind, message = "bad_response", str(exc)
            if events is not None:
                events[f"{self.role}.{kind}"] += 1
            if not retryable or attempt > self.max_retries:
                raise BackendError(self.role, kind, message, attempt)
            delay = self.backoff_s * (2 ** (attempt - 1))
            await asyncio.sleep(delay * (0.5 + random.random() * 0.5))
        raise AssertionError("unreachable")


class _BadResponse(ValueError):
    pass


def _content(text: str) -> str:
    """choices[0].message.content of a chat-completions response body."""
    import json

    try:
        obj = json.loads(text)
        content = obj["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise _BadResponse(f"not a chat-completions response ({type(exc).__name__}): {text[:120]!r}") from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise _BadResponse("message content is not text")
    return content


def audio_part(wav_b64: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": wav_b64, "format": "wav"}}
