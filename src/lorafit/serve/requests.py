"""Request bodies checked field by field: a bad one is a 400 naming the field, never a crash.

Each endpoint declares its fields (:data:`COMPLETION`, :data:`CHAT`, :data:`CLASSIFY`). An
unknown field is refused (a typo such as ``max_token`` would otherwise be silently ignored), and
so is an OpenAI field set to a value lorafit does not implement (penalties, ``best_of``): the
request would otherwise get an answer computed differently from what it asked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from lorafit.serve.adapters import ServeError

MISSING = object()


def parse_body(raw: bytes, max_bytes: int) -> dict[str, Any]:
    """The JSON object of a request body (413 when over ``max_bytes``, 400 when not a JSON object)."""
    if len(raw) > max_bytes:
        raise ServeError(413, f"request body is {len(raw)} bytes; the limit is {max_bytes} (--max-request-bytes)")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ServeError(400, f"request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ServeError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _bad(name: str, what: str) -> ServeError:
    return ServeError(400, f"field {name!r}: {what}", param=name)


def text(name: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _bad(name, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _bad(name, "must not be empty")
    return value


def texts(name: str, value: Any, max_items: int) -> list[str]:
    """A string or a non-empty list of non-empty strings (at most ``max_items``)."""
    if isinstance(value, str):
        return [text(name, value)]
    if not isinstance(value, list) or not value:
        raise _bad(name, "must be a string or a non-empty list of strings")
    if len(value) > max_items:
        raise _bad(name, f"{len(value)} items; at most {max_items} per request")
    return [text(f"{name}[{i}]", v) for i, v in enumerate(value)]


def prompts(name: str, value: Any, max_items: int) -> list[str | list[int]]:
    """OpenAI's ``prompt``: a string, a list of strings, a list of token ids, or a list of such lists.

    Token ids are checked for type here and against the vocabulary by the backend.
    """
    def ids(where: str, v: list) -> list[int]:
        if not v or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
            raise _bad(where, "a token-id prompt must be a non-empty list of non-negative integers")
        return list(v)
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return [ids(name, value)]
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        if len(value) > max_items:
            raise _bad(name, f"{len(value)} items; at most {max_items} per request")
        return [ids(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, list) and any(not isinstance(v, str) for v in value):
        raise _bad(name, "must be a string, a list of strings, a list of token ids or a list of token-id lists")
    return texts(name, value, max_items)


def number(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _bad(name, f"must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise _bad(name, f"{value} is outside [{lo:g}, {hi:g}]")
    return value


def stops(name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > 4 or not all(isinstance(s, str) and s for s in value):
        raise _bad(name, "must be a non-empty string or a list of at most 4 non-empty strings")
    return tuple(value)


def fixed(default: Any, *allowed: Any) -> Callable[[str, Any], Any]:
    """A field accepted only at a value that changes nothing (OpenAI's defaults lorafit does not extend)."""
    ok = (default, *allowed)

    def check(name: str, value: Any) -> Any:
        if value not in ok:
            raise _bad(name, f"{json.dumps(value)} is not supported by lorafit serve (allowed: "
                             f"{', '.join(json.dumps(v) for v in ok)})")
        return value
    return check


def any_of(*types: type) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if value is not None and not isinstance(value, types):
            raise _bad(name, f"must be {' or '.join(t.__name__ for t in types)}, got {type(value).__name__}")
        return value
    return check


def messages(name: str, value: Any, max_items: int) -> list[dict[str, str]]:
    """OpenAI chat messages -> [{role, content}] with text content (content parts of type text joined)."""
    if not isinstance(value, list) or not value:
        raise _bad(name, "must be a non-empty list of {role, content} objects")
    if len(value) > max_items:
        raise _bad(name, f"{len(value)} messages; at most {max_items} per request")
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "must be an object with 'role' and 'content'")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise _bad(where, f"unknown key {extra[0]!r} (a message has role, content, name)")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad(f"{where}.role", f"{json.dumps(role)} is not one of system, developer, user, assistant")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise _bad(f"{where}.content[{j}]", "only {type: text, text: ...} parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        out.append({"role": role, "content": text(f"{where}.content", content, allow_empty=role == "assistant")})
    return out


def read_fields(body: dict[str, Any], spec: dict[str, tuple[Callable[[str, Any], Any], Any]]) -> dict[str, Any]:
    """Check ``body`` against ``spec`` ({field: (check(name, value), default or MISSING = required)})."""
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise ServeError(400, f"unknown field {unknown[0]!r} (this endpoint takes: {', '.join(sorted(spec))})",
                         param=unknown[0])
    out = {}
    for name, (check, default) in spec.items():
        if name not in body or (body[name] is None and default is not MISSING):
            if default is MISSING:
                raise _bad(name, "is required")
            out[name] = default
        else:
            out[name] = check(name, body[name])
    return out


MAX_N = 16  # choices per prompt (``n``); prompts x n is bounded by the request's max_inputs too


def sampling_fields(max_tokens_limit: int, default_max_tokens: int) -> dict:
    """The generation fields common to /v1/completions and /v1/chat/completions."""
    return {
        "model": (text, MISSING),
        "max_tokens": (lambda n, v: number(n, v, 0, max_tokens_limit, integer=True), default_max_tokens),
        "temperature": (lambda n, v: number(n, v, 0, 2), 1.0),
        "top_p": (lambda n, v: number(n, v, 0, 1), 1.0),
        "stop": (stops, ()),
        "stream": (fixed(False, True), False),
        "stream_options": (any_of(dict), None),
        "seed": (lambda n, v: number(n, v, -(2**63), 2**64 - 1, integer=True), None),
        "n": (lambda n, v: number(n, v, 1, MAX_N, integer=True), 1),
        "user": (any_of(str), None),
        "presence_penalty": (fixed(0, 0.0), 0),
        "frequency_penalty": (fixed(0, 0.0), 0),
        "logit_bias": (fixed(None, {}), None),
    }


def completion_spec(max_tokens_limit: int, max_inputs: int) -> dict:
    return {
        **sampling_fields(max_tokens_limit, min(16, max_tokens_limit)),  # OpenAI's default max_tokens: 16
        "prompt": (lambda n, v: prompts(n, v, max_inputs), MISSING),
        "echo": (any_of(bool), False),
        "logprobs": (lambda n, v: number(n, v, 0, 5, integer=True), None),  # top alternatives per token
        "best_of": (fixed(1), 1),
        "suffix": (fixed(None, ""), None),
    }


def chat_spec(max_tokens_limit: int, max_inputs: int) -> dict:
    return {
        **sampling_fields(max_tokens_limit, max_tokens_limit),
        "messages": (lambda n, v: messages(n, v, max_inputs), MISSING),
        "max_completion_tokens": (lambda n, v: number(n, v, 1, max_tokens_limit, integer=True), None),
        "logprobs": (any_of(bool), False),
        "top_logprobs": (lambda n, v: number(n, v, 0, 20, integer=True), None),
        "response_format": (fixed(None, {"type": "text"}), None),
    }


def classify_spec(max_inputs: int) -> dict:
    return {"model": (text, MISSING), "input": (lambda n, v: texts(n, v, max_inputs), MISSING)}


def image_spec(max_inputs: int) -> dict:
    def images(name: str, value: Any) -> str | list[str]:
        if isinstance(value, list):
            if not value or len(value) > max_inputs:
                raise _bad(name, f"must hold 1 to {max_inputs} base64 images")
            return value
        return value
    return {"model": (text, MISSING), "image": (images, MISSING)}


def detect_spec() -> dict:
    """NMS settings a /v1/detect request may set (defaults: the server's, as Ultralytics' predict)."""
    return {"conf": (lambda n, v: number(n, v, 0, 1), None), "iou": (lambda n, v: number(n, v, 0, 1), None),
            "max_det": (lambda n, v: number(n, v, 1, 1000, integer=True), None)}
