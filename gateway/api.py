"""The OpenAI API's shapes, mapped onto the Generator's: requests in, responses and stream
chunks out. Pure functions, no I/O (gateway/app.py serves them).

A request names the model as the gateway serves it (`SPECD_MODEL_NAME`), optionally with a
strategy suffix (`qwen2.5-coder-1.5b-instruct:cascade`); the `specd` extension object
(`extra_body={"specd": {...}}` in the openai package) chooses the strategy and its draft
length, and keeps the session for a later turn. A field the OpenAI API defines that specd
cannot honour is refused with 400 and its name, unless it holds the value that asks for
nothing (`n: 1`, `presence_penalty: 0`, `logprobs: false`, ...): a client that sends
defaults works, and no request is silently answered differently from what it asked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.pb import specd_pb2 as pb

STRATEGY_NAMES = ("ar", "lookup", "sd", "sd-pipe", "cascade", "staged", "slem", "tli", "slrs")
MAX_STOP = 16
ROLES = ("system", "developer", "user", "assistant")

# OpenAI fields specd does not implement, with the values that ask for nothing.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None),
    "logprobs": (False, None, 0),
    "top_logprobs": (0, None),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "echo": (False, None),
    "suffix": (None, ""),
    "best_of": (1, None),
    "n": (1, None),
    "modalities": (None, ["text"]),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    "reasoning_effort": (None,),
    "prediction": (None,),
    "audio": (None,),
    "web_search_options": (None,),
}
IGNORED = ("user", "safety_identifier", "prompt_cache_key")  # labels for the caller's bookkeeping


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Parsed:
    """A request as the Generator takes it, and how to answer it."""

    request: pb.GenerateRequest
    kind: str  # chat | completion
    model: str  # as the client named it (echoed in the response)
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    keep_session: bool  # the caller continues the session later (specd.session_id given or asked for)


def _number(body: Mapping, name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a number, got {value!r}", name)
    if value < low or (low_open and value == low) or value > high:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise ApiError(400, f"'{name}' must be {bound} and <= {high:g}, got {value!r}", name)
    return float(value)


def _integer(body: Mapping, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {value!r}", name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def _flag(options: Mapping, name: str, default: bool) -> bool:
    """A true-or-false field of the `specd` object."""
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise ApiError(400, f"'specd.{name}' must be true or false", f"specd.{name}")
    return value


def _text(value: Any, name: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"'{name}[{i}]': only text parts are supported ({{'type': 'text', 'text': ...}})", name)
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"'{name}' must be a string or a list of text parts", name)


def _check_fields(body: Mapping, known: set[str]) -> None:
    for name, value in body.items():
        if name in known or name in IGNORED:
            continue
        if name in NEUTRAL:
            if value not in NEUTRAL[name]:
                raise ApiError(400, f"'{name}' is not supported by specd (only {NEUTRAL[name][0]!r})", name)
            continue
        raise ApiError(400, f"unknown field '{name}'", name)


COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
          "stream_options", "specd"}  # fmt: skip


def parse(body: Any, kind: str, served: str, max_tokens_limit: int = 1 << 20) -> Parsed:
    """A /v1/chat/completions (kind "chat") or /v1/completions ("completion") body; raises
    ApiError naming the field that is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    extra = "messages" if kind == "chat" else "prompt"
    _check_fields(body, COMMON | {extra})
    request = pb.GenerateRequest()
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required", "model")
    name, _, suffix = model.partition(":")
    if name != served:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{served}' (GET /v1/models)",
                       "model", "model_not_found")  # fmt: skip
    options = body.get("specd") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'specd' must be an object", "specd")
    unknown = set(options) - {"strategy", "k", "session_id", "keep_session", "top_k", "head_only"}
    if unknown:
        raise ApiError(400, f"unknown field 'specd.{sorted(unknown)[0]}'", f"specd.{sorted(unknown)[0]}")
    strategy = options.get("strategy", suffix)
    if strategy and strategy not in STRATEGY_NAMES:
        raise ApiError(400, f"unknown strategy {strategy!r}; one of {', '.join(STRATEGY_NAMES)}",
                       "specd.strategy" if "strategy" in options else "model")  # fmt: skip
    request.strategy = strategy or ""
    k = _integer(options, "k", 0, 64)
    if k:
        request.options.k = k
    top_k = _integer(options, "top_k", 1, 1 << 20)
    if top_k is not None:
        request.top_k = top_k
    request.options.head_only = _flag(options, "head_only", False)
    session_id = options.get("session_id", "")
    if not isinstance(session_id, str):
        raise ApiError(400, "'specd.session_id' must be a string", "specd.session_id")
    request.session_id = session_id
    keep = _flag(options, "keep_session", bool(session_id))

    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ApiError(400, f"'messages[{i}].role' must be one of {', '.join(ROLES)}", f"messages[{i}].role")
            role = "system" if m["role"] == "developer" else m["role"]
            request.chat.messages.append(pb.ChatMessage(role=role, content=_text(m.get("content"), f"messages[{i}].content")))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string (or a list of one string)", "prompt")
        request.prompt = prompt

    limit = _integer(body, "max_completion_tokens", 1, max_tokens_limit)
    if limit is None:
        limit = _integer(body, "max_tokens", 1, max_tokens_limit)
    if limit is not None:
        request.max_new_tokens = limit
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        request.temperature = temperature
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    if top_p is not None:
        request.top_p = top_p
    seed = _integer(body, "seed", -(1 << 63), (1 << 64) - 1)
    if seed is not None:
        request.seed = seed % (1 << 64)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
            raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
        request.stop.extend(stops)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage", "include_obfuscation"}:
        raise ApiError(400, "'stream_options' takes only include_usage", "stream_options")
    return Parsed(request, kind, model, stream, bool(stream_options.get("include_usage")), keep)


FINISH = {"stop": "stop", "stop_string": "stop", "length": "length", "context": "length"}


def usage(stats: pb.GenerationStats) -> dict:
    """OpenAI's usage object; the speculative counts in its prediction fields."""
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.new_tokens,
        "total_tokens": stats.prompt_tokens + stats.new_tokens,
        "completion_tokens_details": {
            "accepted_prediction_tokens": stats.accepted,
            "rejected_prediction_tokens": stats.drafted - stats.accepted,
        },
    }


def extension(stats: pb.GenerationStats) -> dict:
    """The `specd` object of a response: how the answer was produced."""
    return {
        "session_id": stats.session_id,
        "strategy": stats.strategy,
        "mean_accepted_length": round(stats.mean_accepted_length, 4),
        "acceptance_rate": round(stats.acceptance_rate, 4),
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "target_forwards": stats.target_forwards,
        "tokens_per_second": round(stats.tokens_per_second, 3),
    }


class Answer:
    """Builds the response objects of one request: the whole answer, or its stream chunks."""

    def __init__(self, parsed: Parsed, request_id: str) -> None:
        self.parsed = parsed
        chat = parsed.kind == "chat"
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())

    def _envelope(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.parsed.model}

    def complete(self, text: str, stats: pb.GenerationStats) -> dict:
        finish = FINISH.get(stats.finish_reason, "stop")
        if self.parsed.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._envelope(self.object), "choices": [choice], "usage": usage(stats), "specd": extension(stats)}

    def chunk(self, text: str | None = None, *, first: bool = False, finish: str | None = None) -> dict:
        """A stream chunk: the first (the assistant's role), a text delta, or the last (a finish reason)."""
        if self.parsed.kind == "chat":
            delta: dict = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._envelope("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._envelope("text_completion"), "choices": [choice]}

    def last(self, stats: pb.GenerationStats) -> dict:
        out = self.chunk(finish=FINISH.get(stats.finish_reason, "stop"))
        out["specd"] = extension(stats)
        return out

    def usage_chunk(self, stats: pb.GenerationStats) -> dict:
        name = "chat.completion.chunk" if self.parsed.kind == "chat" else "text_completion"
        return {**self._envelope(name), "choices": [], "usage": usage(stats)}
