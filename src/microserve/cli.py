"""The ``microserve`` command line: flags map onto :class:`~microserve.settings.Settings` fields."""

from __future__ import annotations

import logging
import socket
import sys
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
    embedding_model: Annotated[
        str | None,
        typer.Option(help="Embedding model: built-in name or sentence-transformers dir; `none` [all-minilm-l6-v2]."),
    ] = None,
    rerank_model: Annotated[
        str | None, typer.Option(help="CrossEncoder directory for /v1/ranking and /v1/rerank.")
    ] = None,
    encoder_max_batch: Annotated[int | None, typer.Option(help="Most inputs per encoder forward pass [32].")] = None,
    encoder_max_wait_ms: Annotated[float | None, typer.Option(help="Wait to fill an encoder batch, ms [5].")] = None,
    prefill_chunk: Annotated[
        int | None, typer.Option(help="Most prompt tokens per step while streams decode [adaptive].")
    ] = None,
    prefix_cache: Annotated[
        bool | None, typer.Option("--prefix-cache/--no-prefix-cache", help="Reuse shared prompt prefixes [on].")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Model cache [~/.cache/microserve].")] = None,
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
        embedding_model=embedding_model,
        rerank_model=rerank_model,
        encoder_max_batch=encoder_max_batch,
        encoder_max_wait_ms=encoder_max_wait_ms,
        prefill_chunk=prefill_chunk,
        prefix_cache=prefix_cache,
        log_level=log_level,
        cache_dir=cache_dir,
    )
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # Imported here so `microserve version` and `--help` stay fast.
    import uvicorn

    from microserve.catalog.resolve import resolve_encoder, resolve_model
    from microserve.server.app import create_app
    from microserve.store import ArtifactError, ModelStore

    store = ModelStore(settings.cache_dir)
    try:
        resolved = resolve_model(settings.model, store, settings.served_model_name)
        models = [resolved]
        if settings.embedding_model:
            models.append(resolve_encoder(settings.embedding_model, store, "embedding"))
        if settings.rerank_model:
            models.append(resolve_encoder(settings.rerank_model, store, "ranking"))
    except (ArtifactError, OSError) as exc:
        _fail(str(exc))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        _fail(f"two served models share a name: {', '.join(names)}")
    sock = _bind(settings.host, settings.port)
    config = uvicorn.Config(
        create_app(settings, models),
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    typer.echo(f"microserve {__version__}: serving {', '.join(names)} on http://{settings.host}:{settings.port}")
    uvicorn.Server(config).run(sockets=[sock])


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
