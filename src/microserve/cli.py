"""The ``microserve`` command line: flags map onto :class:`~microserve.settings.Settings` fields."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError

from microserve import __version__
from microserve.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="An open inference microservice.")


def _fail(message: str) -> NoReturn:
    typer.echo(f"microserve: error: {message}", err=True)
    raise typer.Exit(code=2)


def _settings(**flags: Any) -> Settings:
    # Only flags the user gave override the environment; pydantic-settings reads MICROSERVE_* for the rest.
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        _fail(f"invalid setting {'.'.join(str(p) for p in first['loc'])}: {first['msg']}")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    sock.set_inheritable(True)
    return sock


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help="Built-in model name or GGUF path.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [8000].")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Name clients use as `model`.")] = None,
    context_length: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    parallel: Annotated[int | None, typer.Option(help="Sequences decoded together [8].")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads [usable cores].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Most tokens per decode step [256].")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Model cache [~/.cache/microserve].")] = None,
    # -- operations: keys, admission, limits, drain, logs, TLS (keys themselves only via MICROSERVE_API_KEYS) --
    api_key_file: Annotated[Path | None, typer.Option(help="File of API keys or sha256:<hex> digests.")] = None,
    metrics_public: Annotated[bool | None, typer.Option(help="Serve metrics without an API key.")] = None,
    max_queue: Annotated[int | None, typer.Option(help="Waiting requests per model [4 x parallel].")] = None,
    queue_timeout: Annotated[float | None, typer.Option(help="Seconds a request may wait for a slot [30].")] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="Largest request body [2 MiB].")] = None,
    max_tokens_limit: Annotated[int | None, typer.Option(help="Most completion tokens per request.")] = None,
    max_messages: Annotated[int | None, typer.Option(help="Most messages per chat request [1024].")] = None,
    max_stop_sequences: Annotated[int | None, typer.Option(help="Most stop strings per request [4].")] = None,
    max_stop_length: Annotated[int | None, typer.Option(help="Longest stop string [256].")] = None,
    max_n: Annotated[int | None, typer.Option(help="Largest n [16].")] = None,
    drain_timeout: Annotated[float | None, typer.Option(help="Seconds to finish requests on SIGTERM [30].")] = None,
    log_format: Annotated[str | None, typer.Option(help="text or json.")] = None,
    log_prompts: Annotated[bool | None, typer.Option(help="Log prompt text.")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    ssl_ca_certs: Annotated[Path | None, typer.Option(help="CA bundle; requires client certificates.")] = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API."""
    settings = _settings(
        model=model,
        host=host,
        port=port,
        served_model_name=served_model_name,
        context_length=context_length,
        parallel=parallel,
        threads=threads,
        batch_size=batch_size,
        log_level=log_level,
        cache_dir=cache_dir,
        api_key_file=api_key_file,
        metrics_public=metrics_public,
        max_queue=max_queue,
        queue_timeout=queue_timeout,
        max_body_bytes=max_body_bytes,
        max_tokens_limit=max_tokens_limit,
        max_messages=max_messages,
        max_stop_sequences=max_stop_sequences,
        max_stop_length=max_stop_length,
        max_n=max_n,
        drain_timeout=drain_timeout,
        log_format=log_format,
        log_prompts=log_prompts,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        ssl_ca_certs=ssl_ca_certs,
    )
    # Imported here so `microserve version` and `--help` stay fast.
    import ssl

    import uvicorn

    from microserve.catalog.resolve import resolve_model
    from microserve.server.app import create_app
    from microserve.server.auth import KeyFileError
    from microserve.server.drain import DrainingServer
    from microserve.server.logging import configure_logging
    from microserve.store import ArtifactError, ModelStore

    configure_logging(settings.log_level, settings.log_format)
    if (settings.ssl_certfile is None) != (settings.ssl_keyfile is None):
        _fail("--ssl-certfile and --ssl-keyfile go together")
    if settings.ssl_ca_certs is not None and settings.ssl_certfile is None:
        _fail("--ssl-ca-certs needs --ssl-certfile and --ssl-keyfile")

    try:
        resolved = resolve_model(settings.model, ModelStore(settings.cache_dir), settings.served_model_name)
    except (ArtifactError, OSError) as exc:
        _fail(str(exc))
    try:
        application = create_app(settings, [resolved])
    except KeyFileError as exc:
        _fail(str(exc))
    sock = _bind(settings.host, settings.port)
    config = uvicorn.Config(
        application,
        log_level=settings.log_level,
        log_config=None,  # keep the handlers configure_logging set (text or JSON lines)
        access_log=False,
        # The drain has already waited for in-flight requests; this only bounds closing idle connections.
        timeout_graceful_shutdown=5,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        ssl_ca_certs=str(settings.ssl_ca_certs) if settings.ssl_ca_certs else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if settings.ssl_ca_certs else ssl.CERT_NONE,
    )
    scheme = "https" if settings.ssl_certfile else "http"
    typer.echo(f"microserve {__version__}: serving {resolved.name} on {scheme}://{settings.host}:{settings.port}")
    server = DrainingServer(config, application.state.drain, settings.drain_timeout)
    server.run(sockets=[sock])


@app.command()
def version() -> None:
    """Print the package version and the engine library's version."""
    try:
        import llama_cpp

        engine = f"llama-cpp-python {llama_cpp.__version__}"
    except ImportError:  # pragma: no cover - the dependency is mandatory
        engine = "llama-cpp-python missing"
    typer.echo(f"microserve {__version__} ({engine})")


def main() -> None:
    """Console-script entry point."""
    app()
