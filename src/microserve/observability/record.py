"""The record of one request: filled in by the layers it passes through, logged once when it ends."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    """What one request did, filled in by the layers it passes through and logged when it ends."""

    request_id: str
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None
    queue_time: float = 0.0
    finish_reason: str | None = None
    # Run when the response is over, however it ended: frees admission slots a stream never got to release.
    cleanups: list[Callable[[], None]] = field(default_factory=list)


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("microserve_request", default=None)


def current_record() -> RequestRecord | None:
    """The record of the request being served in this context, if any."""
    return _current.get()


def open_record(request_id: str) -> tuple[RequestRecord, contextvars.Token[RequestRecord | None]]:
    """A new record, current in this context until :func:`close_record` is called with the token."""
    record = RequestRecord(request_id)
    return record, _current.set(record)


def close_record(token: contextvars.Token[RequestRecord | None]) -> None:
    """Stop the record opened with ``token`` being current."""
    _current.reset(token)
