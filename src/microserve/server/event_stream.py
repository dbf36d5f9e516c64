"""Server-sent events with an ``event:`` line naming each event, as the Responses and Anthropic Messages streams
send them (OpenAI's chat stream sends ``data:`` lines only, see ``streaming.py``). No ``[DONE]`` follows: each of
these streams ends with its own last event."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel
from starlette.responses import StreamingResponse

from microserve.errors import ServiceError

log = logging.getLogger(__name__)

# Builds the stream's error event from a status and message (and the error's param and code).
ErrorEvent = Callable[[int, str, str | None, str | None], BaseModel]


async def event_lines(events: AsyncIterator[BaseModel], error: ErrorEvent) -> AsyncIterator[bytes]:
    """``event: <type>`` / ``data: {json}`` pairs; an error mid-stream becomes the stream's error event."""
    try:
        async for event in events:
            kind = getattr(event, "type", "message")
            yield b"event: " + kind.encode() + b"\ndata: " + event.model_dump_json().encode() + b"\n\n"
    except ServiceError as exc:
        failed = error(exc.status_code, exc.message, exc.param, exc.code)
        yield b"event: error\ndata: " + failed.model_dump_json().encode() + b"\n\n"
    except Exception as exc:
        log.exception("stream failed")
        failed = error(500, f"internal error: {exc}", None, None)
        yield b"event: error\ndata: " + failed.model_dump_json().encode() + b"\n\n"


def event_response(events: AsyncIterator[BaseModel], error: ErrorEvent) -> StreamingResponse:
    """A streamed response of named events; Starlette cancels the generator when the client leaves."""
    return StreamingResponse(
        event_lines(events, error),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
