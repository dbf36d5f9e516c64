"""The served ``/openapi.json``: FastAPI's schema with this server's own limits written in.

The request models carry OpenAI's bounds; the operator's limits (``max_n``, ``max_stop_sequences``,
``max_stop_length``, ``max_messages``, ``max_tokens_limit``) are settings, so they are written into the schema of
every generation request here. Clients that generate code from the schema, and fuzzers that take it at its word,
then see exactly what the server accepts; streamed routes also document their ``text/event-stream`` reply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from microserve.protocol.common import MAX_STOP_SEQUENCES
from microserve.services.limits import RequestLimits

# The request bodies that carry SamplingFields, by the schema names FastAPI gives them.
_GENERATION_REQUESTS = ("ChatCompletionRequest", "CompletionRequest")
_STREAMED_ROUTES = ("/v1/chat/completions", "/v1/completions")
_EVENT_STREAM = {
    "schema": {"type": "string", "description": "Server-sent events: `data: {chunk}` lines, then `data: [DONE]`."}
}


def _branches(prop: dict[str, Any]) -> list[dict[str, Any]]:
    """The non-null alternatives of a property schema (itself when it has none)."""
    options = prop.get("anyOf") or prop.get("oneOf")
    return [o for o in options if o.get("type") != "null"] if options else [prop]


def _cap(prop: dict[str, Any] | None, kind: str, **bounds: int) -> None:
    """Tighten the bounds of the ``kind`` alternatives of ``prop`` (never loosen them)."""
    if prop is None:
        return
    for branch in _branches(prop):
        if branch.get("type") != kind:
            continue
        for key, value in bounds.items():
            current = branch.get(key)
            branch[key] = value if current is None else min(current, value)


def apply_limits(schema: dict[str, Any], limits: RequestLimits) -> dict[str, Any]:
    """Write ``limits`` into the generation request schemas of an OpenAPI document (in place; returned)."""
    components = schema.get("components", {}).get("schemas", {})
    for name, component in components.items():
        if name.split("-")[0] not in _GENERATION_REQUESTS:
            continue
        props = component.get("properties", {})
        _cap(props.get("n"), "integer", maximum=limits.max_n)
        stops = min(limits.max_stop_sequences, MAX_STOP_SEQUENCES)
        _cap(props.get("stop"), "array", maxItems=stops)
        _cap(props.get("stop"), "string", maxLength=limits.max_stop_length)
        for branch in _branches(props.get("stop", {})):
            if branch.get("type") == "array":
                _cap(branch.get("items"), "string", maxLength=limits.max_stop_length)
        if "messages" in props:
            _cap(props["messages"], "array", maxItems=limits.max_messages)
        if limits.max_tokens is not None:
            for field in ("max_tokens", "max_completion_tokens"):
                _cap(props.get(field), "integer", maximum=limits.max_tokens)
                default = props.get(field, {}).get("default")
                if isinstance(default, int) and default > limits.max_tokens:
                    props[field]["default"] = limits.max_tokens  # the operator's limit caps the default too
    for path in _STREAMED_ROUTES:
        reply = schema.get("paths", {}).get(path, {}).get("post", {}).get("responses", {}).get("200")
        if reply is not None:
            reply.setdefault("content", {})["text/event-stream"] = _EVENT_STREAM
    return schema


def apply_vocabulary(schema: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Bound the token ids of ``/detokenize`` by the vocabulary (in place; returned)."""
    component = schema.get("components", {}).get("schemas", {}).get("DetokenizeRequest", {})
    items = component.get("properties", {}).get("tokens", {}).get("items")
    if isinstance(items, dict):
        items["minimum"] = 0
        items["maximum"] = vocab_size - 1
    return schema


def install_openapi(
    app: FastAPI, limits: RequestLimits, vocab_size: Callable[[], int | None] = lambda: None
) -> Callable[[], dict[str, Any]]:
    """Make ``app.openapi`` serve FastAPI's schema (built once, on first use) with ``limits`` written in, and the
    vocabulary bound once ``vocab_size`` knows it (the smallest of the served text models', once they loaded)."""
    build = app.openapi
    done = vocab_done = False

    def openapi() -> dict[str, Any]:
        nonlocal done, vocab_done
        document = build()  # FastAPI caches the document it builds in app.openapi_schema
        if not done:
            apply_limits(document, limits)
            done = True
        if not vocab_done:
            size = vocab_size()
            if size is not None:
                apply_vocabulary(document, size)
                vocab_done = True
        return document

    app.openapi = openapi  # type: ignore[method-assign]
    return openapi
