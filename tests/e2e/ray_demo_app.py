"""A small stand-in for microserve's app on Ray replicas: it says which process served each request and streams
slowly on demand, so that routing, streaming and a killed replica can be tested in seconds."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


def demo_app(settings: Any) -> FastAPI:
    app = FastAPI()
    pid = os.getpid()

    @app.get("/v1/health/ready")
    async def ready() -> dict[str, str]:
        return {"object": "health.response", "message": "ready"}

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def complete(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": {"message": "body is not JSON"}}, status_code=400)
        chunks = int(body.get("max_tokens", 4))
        delay = float(body.get("delay", 0.0))
        if not body.get("stream"):
            return JSONResponse({"replica": pid, "model": body.get("model")}, headers={"x-replica": str(pid)})

        async def events() -> AsyncIterator[bytes]:
            for i in range(chunks):
                choice = {"index": 0, "delta": {"content": f"{i} "}, "finish_reason": None}
                yield b"data: " + json.dumps({"replica": pid, "choices": [choice]}).encode() + b"\n\n"
                await asyncio.sleep(delay)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"x-replica": str(pid)})

    @app.get("/v1/metrics")
    async def metrics() -> Response:
        text = f'# HELP demo_requests Requests.\n# TYPE demo_requests counter\ndemo_requests_total{{pid="{pid}"}} 1.0\n'
        return Response(text, media_type="text/plain")

    @app.get("/pid")
    async def whoami() -> dict[str, int]:
        return {"pid": pid}

    return app
