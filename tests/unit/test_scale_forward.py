"""A forwarded request served by an ASGI app in-process, as a Ray replica serves it: status, headers, streamed
chunks, disconnects, and the app's lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from microserve.scale.forward import ForwardedRequest, Lifespan, ResponseStart, call, serve_asgi


def make_app(events: list[str]) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse(
            {"got": body, "q": request.url.query, "h": request.headers.get("x-test")},
            status_code=201,
            headers={"x-replica": "one"},
        )

    @app.get("/stream")
    async def stream(n: int = 3) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            try:
                for i in range(n):
                    yield f"data: {i}\n\n".encode()
                    await asyncio.sleep(0.01)
            finally:
                events.append("stream closed")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("bug")

    return app


async def collect(app: FastAPI, request: ForwardedRequest) -> tuple[ResponseStart, list[bytes]]:
    items = [item async for item in serve_asgi(app, request)]
    start = items[0]
    assert isinstance(start, ResponseStart)
    assert all(isinstance(i, bytes) for i in items[1:])
    return start, [i for i in items[1:] if isinstance(i, bytes)]


def test_a_request_keeps_its_method_path_query_headers_and_body() -> None:
    app = make_app([])
    request = ForwardedRequest(
        "POST", "/echo", b"a=1", ((b"Content-Type", b"application/json"), (b"X-Test", b"yes")), b'{"k": 2}'
    )
    start, body = asyncio.run(collect(app, request))
    assert start.status == 201
    assert (b"x-replica", b"one") in start.headers
    assert b"".join(body) == b'{"got":{"k":2},"q":"a=1","h":"yes"}'


def test_a_stream_arrives_chunk_by_chunk() -> None:
    start, body = asyncio.run(collect(make_app([]), ForwardedRequest("GET", "/stream", b"n=4")))
    assert start.status == 200
    assert body == [f"data: {i}\n\n".encode() for i in range(4)]


def test_a_consumer_that_stops_early_stops_the_app() -> None:
    events: list[str] = []
    app = make_app(events)

    async def first_chunk_only() -> bytes:
        stream = serve_asgi(app, ForwardedRequest("GET", "/stream", b"n=1000"))
        async for item in stream:
            if isinstance(item, bytes):
                await stream.aclose()
                return item
        raise AssertionError("no chunk")

    assert asyncio.run(first_chunk_only()) == b"data: 0\n\n"
    assert events == ["stream closed"]


def test_an_app_error_is_its_500_not_a_hang() -> None:
    start, _ = asyncio.run(collect(make_app([]), ForwardedRequest("GET", "/boom")))
    assert start.status == 500


def test_call_and_lifespan() -> None:
    events: list[str] = []
    app = make_app(events)

    async def run() -> tuple[int, bytes]:
        lifespan = Lifespan(app)
        await lifespan.startup()
        result = await call(app, "GET", "/stream")
        await lifespan.shutdown()
        return result

    status, body = asyncio.run(run())
    assert status == 200 and body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert events == ["startup", "stream closed", "shutdown"]


def test_a_failed_startup_is_raised() -> None:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        raise OSError("no model file")
        yield

    async def run() -> None:
        await Lifespan(FastAPI(lifespan=lifespan)).startup()

    with pytest.raises(RuntimeError, match="no model file"):
        asyncio.run(run())


def test_app_builder_rejects_unknown_arguments_before_touching_ray() -> None:
    from microserve.scale.ray_app import app_builder

    with pytest.raises(ValueError, match="unknown argument"):
        app_builder({"replicas": 2, "replcias": 3})
