"""``microserve serve``: plan the models, build the app, listen, and drain on SIGTERM."""

from __future__ import annotations

import inspect
import socket
from typing import Annotated

import typer

from microserve.cli.options import fail, with_settings
from microserve.settings import Settings

# ``--ray`` with no address starts a local Ray head (``microserve.scale.ray_app.LOCAL``; not imported here, so that
# the CLI starts without the Ray layer).
_RAY_LOCAL = "local"
_RAY_FLAGS = [
    inspect.Parameter(
        "ray",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(
                "--ray",
                is_flag=False,
                flag_value=_RAY_LOCAL,
                metavar="[ADDRESS]",
                help="Serve as replicas on Ray Serve (needs the `ray` extra): on the Ray cluster at ADDRESS "
                "(host:port, or `auto` for the one this node belongs to), or on a Ray head started here.",
                show_default=False,
            ),
        ],
    ),
    inspect.Parameter(
        "replicas",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            int | None,
            typer.Option(
                "--replicas", min=1, help="Replicas on Ray Serve (with --ray; default 1).", show_default=False
            ),
        ],
    ),
]


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio turns Nagle's algorithm off only on sockets that say they are TCP, and
    # with it on, every response after the first on a keep-alive connection waited ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, ray: str | None = None, replicas: int | None = None) -> None:
    """Serve models over an OpenAI-compatible HTTP API."""
    if ray is not None:
        _serve_on_ray(settings, ray, replicas or 1)
        return
    if replicas is not None:
        fail("--replicas needs --ray")
    # Imported here so `microserve version` and `--help` stay fast.
    import ssl

    import uvicorn

    from microserve import __version__
    from microserve.catalog.errors import CatalogError
    from microserve.server.app import build_app
    from microserve.server.auth import KeyFileError
    from microserve.server.connections import guarded_protocol
    from microserve.server.drain import CLOSE_GRACE, DrainingServer
    from microserve.server.logging import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    if (settings.ssl_certfile is None) != (settings.ssl_keyfile is None):
        fail("--ssl-certfile and --ssl-keyfile go together")
    if settings.ssl_ca_certs is not None and settings.ssl_certfile is None:
        fail("--ssl-ca-certs needs --ssl-certfile and --ssl-keyfile")
    try:
        application = build_app(settings)
    except (CatalogError, KeyFileError, OSError) as exc:
        fail(str(exc))
    sock = _bind(settings.host, settings.port)
    config = uvicorn.Config(
        application,
        log_level=settings.log_level,
        log_config=None,  # keep the handlers configure_logging set (text or JSON lines)
        access_log=False,
        # Nothing reads the client address, so rewriting it from X-Forwarded-For is work for nothing.
        proxy_headers=False,
        # A deadline on request headers and a cap on connections (server/connections.py); idle keep-alive.
        http=guarded_protocol(settings.header_timeout, settings.max_connections),
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
        # The drain has already ended or cut off every request; this only bounds sending their last bytes.
        timeout_graceful_shutdown=CLOSE_GRACE,  # type: ignore[arg-type]
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        ssl_ca_certs=str(settings.ssl_ca_certs) if settings.ssl_ca_certs else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if settings.ssl_ca_certs else ssl.CERT_NONE,
    )
    scheme = "https" if settings.ssl_certfile else "http"
    names = ", ".join(f"{m.name} ({m.profile.id})" for m in application.state.plan.models)
    typer.echo(f"microserve {__version__}: serving {names} on {scheme}://{settings.host}:{settings.port}")
    server = DrainingServer(config, application.state.drain, settings.drain_timeout)
    server.run(sockets=[sock])


def _serve_on_ray(settings: Settings, address: str, replicas: int) -> None:
    from microserve.server.logging import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        fail(f"--ray needs the `ray` extra (pip install 'microserve[ray]'): {exc}")
    from microserve.scale.ray_app import RayServeOptions, run_on_ray

    run_on_ray(settings, RayServeOptions(replicas=replicas), address, typer.echo)


def register(app: typer.Typer) -> None:
    """Add ``serve``, with a flag for every setting (and ``--ray``, ``--replicas``), to ``app``."""
    app.command("serve")(with_settings(extra=_RAY_FLAGS)(serve))
