"""microserve as a Ray Serve application: an ingress that reads each request's prompt, and replicas that each run
microserve's whole app in-process, behind :class:`~microserve.scale.router.PrefixLoadRouter`.

Ray Serve's HTTP proxy hands requests to the ingress deployment. Ray's router would only see the ASGI scope there
(the body follows later, through the proxy), so the ingress reads the body itself, computes the prefix key of a chat
or completion request, and forwards the raw request with the key through a streaming handle to the replica
deployment, whose router is microserve's. Each replica runs the app (``replica_app``) in its own Ray actor and
streams the response bytes back; the ingress relays them to the client.

Failure: a replica that dies takes its in-flight requests with it; the ingress turns the error Ray raises into a
503 with an OpenAI error body before the response started, or into an SSE error event after (never a hang). Ray's
controller replaces the replica; health checks call the app's ``/v1/health/ready`` in-process. On scale-down Ray
stops routing to a replica and waits ``graceful_shutdown_timeout_s`` for its streams before stopping it.

Ray is imported only inside functions: importing this module needs no ``ray``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from microserve.scale.forward import ASGIApp, ForwardedRequest, Lifespan, ResponseStart, call, serve_asgi
from microserve.scale.policy import (
    DEFAULT_CAPACITY_BLOCKS,
    DEFAULT_IMBALANCE_THRESHOLD,
    DEFAULT_SHARED_THRESHOLD,
    DEFAULT_SLOTS,
    PLACEMENTS,
    Placement,
)
from microserve.scale.prefix import PrefixKey, key_from_body
from microserve.server.auth import METRICS_PATHS
from microserve.settings import Settings

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

log = logging.getLogger(__name__)

# Ray imports the router by this path in each process that routes to the replicas (importing it here would import
# Ray).
ROUTER_PATH = "microserve.scale.router.PrefixLoadRouter"
# Requests whose body carries a prompt worth following to a replica's prefix cache.
PROMPT_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# The response header that names the replica which served a request.
REPLICA_HEADER = b"x-microserve-replica"
# Hop-by-hop and framing headers: the proxy frames the relayed body itself.
_DROPPED_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})


def replica_app(settings: Settings) -> ASGIApp:
    """The app every replica serves: microserve's, built from ``settings`` by ``build_app``."""
    from microserve.server.app import build_app

    return build_app(settings)


class RayServeOptions(BaseModel):
    """How the application runs on Ray Serve: replicas, resources, autoscaling, routing and failure handling."""

    name: str = Field(default="microserve", description="Ray Serve application name.")
    route_prefix: str = Field(default="/", description="Where Ray's HTTP proxy mounts the application.")
    replicas: int = Field(default=1, ge=1, description="Replicas when autoscaling is off.")
    min_replicas: int | None = Field(default=None, ge=0, description="Autoscaling floor; autoscaling is on when set.")
    max_replicas: int | None = Field(default=None, ge=1, description="Autoscaling ceiling (default: min_replicas).")
    target_ongoing_requests: float = Field(
        default=4.0, gt=0, description="Requests in flight per replica that autoscaling aims at (half of 8 slots)."
    )
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    num_cpus: float | None = Field(default=None, gt=0, description="CPUs per replica (default: the threads, else 1).")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica.")
    max_ongoing_requests: int = Field(
        default=16, ge=1, description="Requests Ray sends a replica at once; the rest wait at the router, unbound."
    )
    imbalance_threshold: int = Field(
        default=DEFAULT_IMBALANCE_THRESHOLD,
        ge=0,
        description="Extra queued requests a prefix is worth before load wins.",
    )
    shared_threshold: int = Field(
        default=DEFAULT_SHARED_THRESHOLD,
        ge=0,
        description="Extra queued requests a shared prefix (system prompt) is worth.",
    )
    capacity_blocks: int = Field(
        default=DEFAULT_CAPACITY_BLOCKS, ge=1, description="Prefix blocks remembered per replica."
    )
    placement: Placement = Field(
        default="stalest",
        description=f"How new conversations are placed ({', '.join(PLACEMENTS)}): where the slot they take holds "
        "the stalest conversation, or the less loaded of two random replicas.",
    )
    ingress_replicas: int = Field(default=1, ge=1, description="Ingress replicas (each keeps its own prefix table).")
    graceful_shutdown_timeout_s: float = Field(
        default=60.0, ge=0, description="Time a stopping replica has for its streams."
    )
    health_check_period_s: float = Field(default=2.0, gt=0)
    health_check_timeout_s: float = Field(default=10.0, gt=0)
    ready_timeout_s: float = Field(
        default=900.0, gt=0, description="Time a new replica has to load and warm its models."
    )
    app_factory: str = Field(
        default="microserve.scale.ray_app:replica_app", description="module:function building a replica's ASGI app."
    )


def _import(path: str) -> Callable[[Settings], ASGIApp]:
    module, _, name = path.partition(":")
    factory: Callable[[Settings], ASGIApp] = getattr(importlib.import_module(module), name)
    return factory


class ReplicaServer:
    """One replica: the app, its lifespan, and the streaming method the ingress calls."""

    # Ray runs an async __init__ on the replica's event loop (type checkers insist __init__ be synchronous).
    async def __init__(self, app_factory: str, settings: Settings, ready_timeout_s: float) -> None:  # type: ignore[misc]
        from ray import serve

        # Each response names its replica, so that clients and tests can see where a conversation lives.
        self._replica = serve.get_replica_context().replica_id.unique_id.encode()
        self._app = _import(app_factory)(settings)
        self._lifespan = Lifespan(self._app)
        await self._lifespan.startup()
        # Engines load in the background; Ray counts the replica as started once this returns and its first
        # health check passes, so wait here for the app to say it is ready.
        deadline = time.monotonic() + ready_timeout_s
        while True:
            status, body = await call(self._app, "GET", "/v1/health/ready")
            if status == 200:
                break
            if b"failed to load" in body or time.monotonic() > deadline:
                await self._lifespan.shutdown()
                raise RuntimeError(f"replica not ready: {body.decode(errors='replace')}")
            await asyncio.sleep(0.2)

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """Serve one forwarded request: the response start, then its body chunks."""
        async for item in serve_asgi(self._app, request):
            if isinstance(item, ResponseStart):
                item = ResponseStart(item.status, (*item.headers, (REPLICA_HEADER, self._replica)))
            yield item

    async def metrics(self, request: ForwardedRequest) -> tuple[str, int, bytes]:
        """This replica's answer to a metrics scrape: its id, the status and the body."""
        status, parts = 500, []
        async for item in serve_asgi(self._app, request):
            if isinstance(item, ResponseStart):
                status = item.status
            else:
                parts.append(item)
        return self._replica.decode(), status, b"".join(parts)

    async def check_health(self) -> None:
        """Ray's health check: the app's own readiness."""
        status, body = await call(self._app, "GET", "/v1/health/ready")
        if status != 200:
            raise RuntimeError(f"not ready: {body.decode(errors='replace')}")

    async def __del__(self) -> None:
        await self._lifespan.shutdown()


def _error_response(status: int, message: str, code: str | None = None) -> Response:
    from starlette.responses import JSONResponse

    from microserve.server.errors import error_body

    body = error_body(status, message)
    if code is not None:
        body["error"]["code"] = code
    return JSONResponse(body, status_code=status)


def _describe(exc: BaseException) -> str:
    # Ray's errors carry pages of context; the first line says what happened.
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


class IngressServer:
    """The HTTP entry: reads the body, keys the prompt, forwards to a replica, relays its streamed answer."""

    def __init__(self, replicas: Any, max_body_bytes: int) -> None:
        self._replicas = replicas.options(stream=True, method_name="handle")
        self._all = replicas
        self._max_body_bytes = max_body_bytes

    async def __call__(self, request: Request) -> Response:
        from starlette.responses import StreamingResponse

        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self._max_body_bytes:
                return _error_response(413, f"request body larger than {self._max_body_bytes} bytes")
        path = request.scope["path"]
        if request.method == "GET" and path in METRICS_PATHS:
            return await self._metrics(forwarded_request(request, b"", None))
        key = None
        if request.method == "POST" and path in PROMPT_PATHS:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None  # the replica answers it with the proper 400
            if isinstance(parsed, dict):
                key = key_from_body(parsed)
        stream = self._replicas.remote(forwarded_request(request, bytes(body), key))
        try:
            start = await stream.__anext__()
        except StopAsyncIteration:
            return _error_response(502, "the replica closed the request without answering")
        except Exception as exc:
            log.warning("request failed before its response started: %s", _describe(exc))
            return _error_response(503, f"replica unavailable: {_describe(exc)}", "replica_unavailable")
        if not isinstance(start, ResponseStart):
            stream.cancel()
            return _error_response(502, "the replica answered out of order")
        headers = [(k, v) for k, v in start.headers if k.lower() not in _DROPPED_HEADERS]
        sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
        response = StreamingResponse(self._relay(stream, sse), status_code=start.status)
        response.raw_headers = headers
        return response

    async def _metrics(self, request: ForwardedRequest) -> Response:
        # Every replica's metrics in one scrape, each sample labelled with its replica: through the proxy a scrape
        # reaches one replica, so a scraper could not otherwise see them all.
        from starlette.responses import Response

        from microserve.scale.exposition import merge

        try:
            answers = await self._all.broadcast("metrics", request).results_async(timeout_s=10, return_exceptions=True)
        except Exception as exc:
            return _error_response(503, f"replicas unavailable: {_describe(exc)}", "replica_unavailable")
        good = [(replica, body.decode()) for replica, status, body in _answers(answers) if status == 200]
        if not good:
            refused = [(status, body) for _, status, body in _answers(answers)]
            if refused:
                status, body = refused[0]
                return Response(body, status_code=status, media_type="application/json")
            return _error_response(503, "no replica answered the scrape", "replica_unavailable")
        return Response(merge(good), media_type="text/plain; version=0.0.4; charset=utf-8")

    @staticmethod
    async def _relay(stream: Any, sse: bool) -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        except Exception as exc:
            # The replica died mid-answer. An event stream gets an error event the OpenAI clients raise on; any
            # other body is cut off (the connection drops), which clients report as an incomplete read rather than
            # take a truncated body for a whole one.
            log.warning("replica failed mid-response: %s", _describe(exc))
            if not sse:
                raise
            from microserve.server.errors import error_body

            body = error_body(503, f"replica failed mid-stream: {_describe(exc)}")
            body["error"]["code"] = "replica_unavailable"
            yield b"data: " + json.dumps(body).encode() + b"\n\n"
        finally:
            # The client left (or the stream ended): stop the replica's work on it.
            stream.cancel()


def forwarded_request(request: Request, body: bytes, key: PrefixKey | None) -> ForwardedRequest:
    """The request as a replica receives it."""
    client = request.scope.get("client")
    return ForwardedRequest(
        method=request.method,
        path=request.scope["path"],
        query_string=request.scope.get("query_string", b""),
        headers=tuple((bytes(k), bytes(v)) for k, v in request.scope["headers"]),
        body=body,
        prefix_key=key,
        client=(str(client[0]), int(client[1])) if client else None,
    )


def _answers(results: list[Any]) -> list[tuple[str, int, bytes]]:
    # A replica that failed to answer a broadcast is left out of the scrape.
    return [r for r in results if isinstance(r, tuple)]


def build_application(settings: Settings, options: RayServeOptions | None = None) -> Any:
    """The Ray Serve application (``ray.serve.Application``) for ``settings``: ingress + replicas."""
    from ray import serve

    options = options or RayServeOptions()
    num_cpus = options.num_cpus or float(settings.threads or 1)
    if settings.threads is None:
        # llama.cpp would take every core of the node; a replica gets the CPUs Ray reserved for it.
        settings = settings.model_copy(update={"threads": max(1, math.floor(num_cpus))})
    scaling: dict[str, Any]
    if options.min_replicas is not None:
        scaling = {
            "autoscaling_config": {
                "min_replicas": options.min_replicas,
                "max_replicas": options.max_replicas or max(options.min_replicas, 1),
                "target_ongoing_requests": options.target_ongoing_requests,
                "upscale_delay_s": options.upscale_delay_s,
                "downscale_delay_s": options.downscale_delay_s,
            }
        }
    else:
        scaling = {"num_replicas": options.replicas}
    replica = serve.deployment(
        name="MicroserveReplica",
        **scaling,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": options.num_gpus},
        max_ongoing_requests=options.max_ongoing_requests,
        graceful_shutdown_timeout_s=options.graceful_shutdown_timeout_s,
        health_check_period_s=options.health_check_period_s,
        health_check_timeout_s=options.health_check_timeout_s,
        request_router_config={
            "request_router_class": ROUTER_PATH,
            "request_router_kwargs": {
                "imbalance_threshold": options.imbalance_threshold,
                "shared_threshold": options.shared_threshold,
                "capacity_blocks": options.capacity_blocks,
                # The router places conversations by the slots each replica has: the replicas' parallel setting.
                "slots": settings.parallel or DEFAULT_SLOTS,
                "placement": options.placement,
            },
        },
    )(ReplicaServer)
    ingress = serve.deployment(
        name="MicroserveIngress",
        num_replicas=options.ingress_replicas,
        # The ingress only parses and relays: it must not take a CPU a replica could have.
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,
    )(IngressServer)
    return ingress.bind(replica.bind(options.app_factory, settings, options.ready_timeout_s), settings.max_body_bytes)


def app_builder(args: dict[str, Any]) -> Any:
    """``serve run microserve.ray:app_builder key=value ...`` and RayService's ``import_path``: ``args`` are
    Settings fields (``model``, ``threads``, ...) and :class:`RayServeOptions` fields (``replicas``,
    ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, ...)."""
    ray_fields = set(RayServeOptions.model_fields)
    unknown = set(args) - ray_fields - set(Settings.model_fields)
    if unknown:
        raise ValueError(f"unknown argument(s): {', '.join(sorted(unknown))}")
    options = RayServeOptions(**{k: v for k, v in args.items() if k in ray_fields})
    settings = Settings(**{k: v for k, v in args.items() if k not in ray_fields})
    return build_application(settings, options)


# ``--ray`` without an address: start a Ray head in this process, with this machine's CPUs.
LOCAL = "local"


def run_on_ray(settings: Settings, options: RayServeOptions, address: str, announce: Callable[[str], None]) -> None:
    """``microserve serve --ray [ADDRESS]``: deploy the application on the Ray cluster at ``address`` (``local``
    starts one here) with Ray's HTTP proxy on ``settings.host``:``settings.port``, and keep it up until SIGINT or
    SIGTERM; then delete it (its replicas drain) and, if this process started Ray, stop Ray."""
    import signal
    import threading

    import ray
    from ray import serve

    ray.init(address=None if address == LOCAL else address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        # A Serve instance that is already running keeps its own HTTP options.
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_application(settings, options), name=options.name, route_prefix=options.route_prefix)
        announce(
            f"{options.name}: {options.replicas if options.min_replicas is None else 'autoscaled'} replica(s) on "
            f"Ray Serve at http://{settings.host}:{settings.port}{options.route_prefix}"
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        announce(f"{options.name}: stopping")
        serve.delete(options.name)
        if address == LOCAL:
            serve.shutdown()
    finally:
        ray.shutdown()
