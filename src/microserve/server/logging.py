"""One structured log line per request, the ``X-Request-Id`` echo, HTTP status counts and the request's span.

The line carries the request id (the client's ``X-Request-Id`` or a generated one), method, route, status, model,
prompt and completion tokens, time to first token and duration; as ``key=value`` text or, with
``log_format=json``, one JSON object per line. Prompt text is left out unless ``log_prompts`` is on; API keys never
appear (the Authorization header is not logged).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from microserve.observability.record import RequestRecord, close_record, open_record
from microserve.observability.tracing import Tracing

log = logging.getLogger("microserve.access")

_PROMPT_FIELDS = ("messages", "prompt", "input", "query", "documents")
_LOG_PROMPT_CHARS = 4096
# A value written bare in a text line: printable ASCII without spaces or quotes. Anything else is JSON-quoted, so a
# client cannot break a line (a %0A in the path) or forge `key=value` pairs in it.
_BARE = re.compile(r"[!#-~]*")
# Control characters (and the Unicode line separators) that would let text start a new log line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _bare_or_quoted(value: object) -> object:
    if isinstance(value, str) and not _BARE.fullmatch(value):
        return json.dumps(value)
    return value


class TextFormatter(logging.Formatter):
    """Text log lines with control characters in the message escaped, so that client text quoted in a message
    (a path, a model name) never starts a line of its own; tracebacks keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The record's line, its message made single-line."""
        if _CONTROL.search(record.message):
            record.message = _CONTROL.sub(lambda m: json.dumps(m.group())[1:-1], record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """Log records as JSON lines, timestamped in UTC; a record's ``fields`` extra is merged into the object."""

    machine_readable = True  # progress bars stay off the stream this writes to (microserve.progress)

    def format(self, record: logging.LogRecord) -> str:
        """One JSON object."""
        out: dict[str, Any] = {
            # UTC (the Z), from this formatter alone: the process's other formatters keep local time.
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """Root logging for the CLI: text lines or JSON lines on stderr, uvicorn's loggers included."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def _prompt_of(body: bytes) -> Any:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    for key in _PROMPT_FIELDS:
        if key in data:
            text = json.dumps(data[key], ensure_ascii=False)
            return text if len(text) <= _LOG_PROMPT_CHARS else text[:_LOG_PROMPT_CHARS] + "..."
    return None


class RequestLogMiddleware:
    """Pure ASGI middleware, so streamed responses are timed to their last byte without buffering."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        on_response: Callable[[Scope, int], None] | None = None,
        tracing: Tracing | None = None,
        log_prompts: bool = False,
        quiet_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.on_response = on_response
        self.tracing = tracing
        self.log_prompts = log_prompts
        self.quiet_paths = quiet_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope.get("headers") or []:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
                break
        # 128 random bits as 32 hex digits, the shape of a UUID's hex without the cost of building one.
        request_id = request_id or secrets.token_hex(16)
        scope.setdefault("state", {})["request_id"] = request_id
        record, token = open_record(request_id)
        started = time.perf_counter()
        status = 500
        body: list[bytes] = []

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        async def receive_copy() -> Message:
            message = await receive()
            if message["type"] == "http.request" and sum(map(len, body)) < 4 * _LOG_PROMPT_CHARS:
                body.append(message.get("body", b""))
            return message

        span_name = f"{scope['method']} {scope['path']}"
        try:
            if self.tracing is not None and self.tracing.enabled:
                with self.tracing.span(
                    span_name,
                    {"http.request.method": scope["method"], "url.path": scope["path"], "request.id": request_id},
                ) as span:
                    await self.app(scope, receive_copy if self.log_prompts else receive, send_with_id)
                    span.set_attribute("http.response.status_code", status)
            else:
                await self.app(scope, receive_copy if self.log_prompts else receive, send_with_id)
        finally:
            close_record(token)
            for cleanup in record.cleanups:
                cleanup()
            if self.on_response is not None:
                self.on_response(scope, status)
            if scope["path"] not in self.quiet_paths or status >= 400:
                self._log(scope, status, record, time.perf_counter() - started, body)

    def _log(self, scope: Scope, status: int, record: RequestRecord, duration: float, body: list[bytes]) -> None:
        fields: dict[str, Any] = {
            "request_id": record.request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "model": record.model,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "ttft_ms": round(record.ttft * 1000, 1) if record.ttft is not None else None,
            "queue_ms": round(record.queue_time * 1000, 1),
            "duration_ms": round(duration * 1000, 1),
            "finish_reason": record.finish_reason,
        }
        if self.log_prompts and body:
            fields["prompt"] = _prompt_of(b"".join(body))
        text = " ".join(f"{k}={_bare_or_quoted(v)}" for k, v in fields.items())
        log.info("%s", text, extra={"fields": {"message": "request", **fields}})


def route_label(scope: Mapping[str, object]) -> str:
    """The matched route's template (bounded cardinality), or ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
