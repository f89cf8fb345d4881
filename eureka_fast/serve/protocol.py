"""OpenAI request validation: request bodies -> engine inputs, or an APIError naming the field and the problem."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .engine import (DEFAULT_MAX_TOKENS, DEFAULT_REPETITION_PENALTY, DEFAULT_TEMPERATURE, DEFAULT_TOP_K,
                     DEFAULT_TOP_P, SamplingParams)

MAX_N = 16
MAX_STOP_STRINGS = 8
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields the server cannot honour: refused rather than silently ignored.
_UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "audio",
                "prediction", "best_of", "use_beam_search")


class APIError(Exception):
    """An error answer: HTTP status and the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ChatRequest:
    messages: list  # validated; audio parts still as sent (resolved by the server)
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    max_tokens_given: bool


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        if integer and isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise bad(f"'{name}' must be {kind}, got {type(value).__name__}", name, "invalid_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise bad(f"'{name}' must be finite", name)
    if value < lo or value > hi or (lo_open and value == lo):
        low = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise bad(f"'{name}' must be {low} and <= {hi:g}, got {value}", name)
    return value


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be a boolean, got {type(value).__name__}", name, "invalid_type")
    return value


def sampling_params(body: dict, max_model_len: int, *, temperature_default: float = DEFAULT_TEMPERATURE):
    """SamplingParams from the OpenAI fields and vLLM's extra ones; returns (params, max_tokens_given)."""
    max_tokens = body.get("max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = body.get("max_tokens"), "max_tokens"
    given = max_tokens is not None
    max_tokens = _number({name: max_tokens}, name, DEFAULT_MAX_TOKENS, 1, max_model_len, integer=True)
    temperature = _number(body, "temperature", temperature_default, 0.0, 2.0)
    greedy = temperature == 0
    top_p = _number(body, "top_p", 1.0 if greedy else DEFAULT_TOP_P, 0.0, 1.0, lo_open=True)
    top_k = _number(body, "top_k", 0 if greedy else DEFAULT_TOP_K, -1, 1 << 30, integer=True)
    repetition_penalty = _number(body, "repetition_penalty", DEFAULT_REPETITION_PENALTY, 0.0, 10.0, lo_open=True)
    min_tokens = _number(body, "min_tokens", 0, 0, max_tokens, integer=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad(f"'seed' must be an integer, got {type(seed).__name__}", "seed", "invalid_type")
    if seed is not None and not -(1 << 63) <= seed < (1 << 64):
        raise bad("'seed' is out of range (64-bit integers)", "seed")
    stop = body.get("stop")
    if stop is None:
        stops: tuple = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad("'stop' strings must not be empty", "stop")
    params = SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                            top_k=max(0, int(top_k)), repetition_penalty=float(repetition_penalty),
                            min_tokens=int(min_tokens), ignore_eos=_bool(body, "ignore_eos", False),
                            seed=None if seed is None else int(seed) & ((1 << 64) - 1), stop=stops)
    return params, given


def check_model(body: dict, served_names: tuple[str, ...]) -> None:
    model = body.get("model")
    if model is None:
        return  # as vLLM: the served model
    if not isinstance(model, str):
        raise bad(f"'model' must be a string, got {type(model).__name__}", "model", "invalid_type")
    if model not in served_names:
        raise APIError(404, f"The model '{model[:100]}' does not exist; this server serves "
                            f"{', '.join(repr(n) for n in served_names)}", param="model", code="model_not_found")


def parse_chat(body, served_names: tuple[str, ...], max_model_len: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    check_model(body, served_names)
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of messages", "messages",
                  "invalid_type" if not isinstance(messages, list) else "invalid_value")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        role = message.get("role")
        if role not in _ROLES:
            raise bad(f"{where}.role must be one of system, developer, user, assistant; got {str(role)[:40]!r}",
                      f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            parts = content
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                if not isinstance(part, dict):
                    raise bad(f"{pwhere} must be an object with 'type'", pwhere, "invalid_type")
                kind = part.get("type")
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise bad(f"{pwhere}.text must be a string", f"{pwhere}.text", "invalid_type")
                elif kind in ("input_audio", "audio_url"):
                    if _ROLES[role] != "user":
                        raise bad(f"{pwhere}: audio parts are only allowed in user messages", pwhere)
                    if kind not in part:
                        raise bad(f"{pwhere} of type {kind!r} needs a {kind!r} field", pwhere,
                                  "missing_required_parameter")
                else:
                    raise bad(f"{pwhere}.type must be 'text', 'input_audio' or 'audio_url'; got "
                              f"{str(kind)[:40]!r}", f"{pwhere}.type")
                parts.append(part)
            if _ROLES[role] == "assistant" and any(p["type"] != "text" for p in parts):
                raise bad(f"{where}: assistant messages take text only", where)
        elif content is None and role == "assistant":
            parts = ""
        else:
            raise bad(f"{where}.content must be a string or a list of content parts", f"{where}.content",
                      "invalid_type")
        out.append({"role": _ROLES[role], "content": parts})
    if out[-1]["role"] == "assistant":
        raise bad("the last message must not be an assistant message (continuing an answer is not supported)",
                  "messages")
    params, given = sampling_params(body, max_model_len)
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
        if not stream:
            raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
        include_usage = _bool(options, "include_usage", False)
    return ChatRequest(messages=out, params=params, n=int(n), stream=stream, include_usage=include_usage,
                       max_tokens_given=given)
