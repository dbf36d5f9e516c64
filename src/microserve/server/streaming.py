"""SSE framing and client-disconnect handling for the OpenAI routes."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse

from microserve.errors import ServiceError
from microserve.protocol.common import Reply
from microserve.server.drain import CUT_MESSAGE, stream_started, was_cut
from microserve.server.errors import ClientDisconnected, error_body

log = logging.getLogger(__name__)
T = TypeVar("T")

DONE = b"data: [DONE]\n\n"


def _event(body: Mapping[str, Any]) -> bytes:
    # ASCII escapes: an error message may quote client text that does not encode as UTF-8.
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def sse_lines(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    """``data: {json}`` events, then ``data: [DONE]``; an error mid-stream becomes an error event, and so does the
    drain cutting the stream off (the body still ends cleanly)."""
    entry = stream_started()
    try:
        async for chunk in chunks:
            # OpenAI reply shapes decide field by field what a None means; other models leave Nones out.
            data = chunk.model_dump_json() if isinstance(chunk, Reply) else chunk.model_dump_json(exclude_none=True)
            yield b"data: " + data.encode() + b"\n\n"
    except asyncio.CancelledError:
        if not was_cut(entry):
            raise
        yield _event(error_body(503, CUT_MESSAGE, code="shutting_down"))
        return
    except ServiceError as exc:
        yield _event(exc.body())
        return
    except Exception as exc:
        log.exception("stream failed")
        yield _event(error_body(500, f"internal error: {exc}"))
        return
    yield DONE


def sse_response(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    """A streamed response; Starlette cancels the generator (and so the sequence) when the client leaves."""
    return StreamingResponse(
        sse_lines(chunks),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (frees the engine sequence or queue place).

    ``work`` runs in the request's own task; a watcher task cancels that task when the client goes, and the
    cancellation it caused becomes ClientDisconnected. A cancellation from elsewhere (shutdown) stays one.
    """
    current = asyncio.current_task()
    if current is None:
        return await work
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                current.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if disconnected and current.uncancel() == 0:
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.cancel()
