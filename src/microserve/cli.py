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

_PROFILE = typer.Option(help="Force a profile id (see `microserve profiles`); incompatible is an error.")
_OFFLINE = typer.Option("--offline/--online", help="Never touch the network; use cached artifacts only.")
_CATALOG = typer.Option(help="Folder of extra model manifests (*.yaml).")


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
    # IPPROTO_TCP named explicitly: asyncio turns Nagle's algorithm off only on sockets that say they are TCP, and
    # with it on, every response after the first on a keep-alive connection waited ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    sock.set_inheritable(True)
    return sock


@app.command()
def serve(
    model: Annotated[
        list[str] | None, typer.Option(help="Model to serve: catalog id, GGUF path or hf://owner/repo/file; repeat.")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [8000].")] = None,
    served_model_name: Annotated[
        list[str] | None, typer.Option(help="Name clients use as `model`, one per --model in order.")
    ] = None,
    context_length: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    parallel: Annotated[
        int | None, typer.Option(help="Sequences decoded together (default: the profile's, else 8).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: the usable cores).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Most tokens per decode step (default: the profile's, else 256).")
    ] = None,
    embedding_model: Annotated[
        str | None,
        typer.Option(help="Embedding model: catalog name or sentence-transformers dir; `none` [all-minilm-l6-v2]."),
    ] = None,
    rerank_model: Annotated[
        str | None, typer.Option(help="CrossEncoder directory for /v1/ranking and /v1/rerank.")
    ] = None,
    encoder_max_batch: Annotated[int | None, typer.Option(help="Most inputs per encoder forward pass [32].")] = None,
    encoder_max_wait_ms: Annotated[float | None, typer.Option(help="Wait to fill an encoder batch, ms [5].")] = None,
    encoder_workers: Annotated[
        int | None, typer.Option(help="Encoder passes run side by side [2 when there are 2+ threads].")
    ] = None,
    prefill_chunk: Annotated[
        int | None, typer.Option(help="Most prompt tokens per step while streams decode [adaptive].")
    ] = None,
    prefix_cache: Annotated[
        bool | None,
        typer.Option("--prefix-cache/--no-prefix-cache", help="Reuse shared prompt prefixes (default: on)."),
    ] = None,
    playground: Annotated[
        bool | None,
        typer.Option("--playground/--no-playground", help="Serve the web playground at /playground (default: on)."),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error.")] = None,
    log_format: Annotated[str | None, typer.Option(help="Log line format: text or json (default: text).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Model cache [~/.cache/microserve].")] = None,
    # -- operations: keys, admission, limits, drain, logs, TLS (keys themselves only via MICROSERVE_API_KEYS) --
    api_key_file: Annotated[Path | None, typer.Option(help="File of API keys or sha256:<hex> digests.")] = None,
    metrics_public: Annotated[bool | None, typer.Option(help="Serve metrics without an API key.")] = None,
    max_queue: Annotated[int | None, typer.Option(help="Waiting requests per model [4 x its slots].")] = None,
    queue_timeout: Annotated[float | None, typer.Option(help="Seconds a request may wait for a slot [30].")] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="Largest request body [2 MiB].")] = None,
    max_tokens_limit: Annotated[int | None, typer.Option(help="Most completion tokens per request.")] = None,
    max_messages: Annotated[int | None, typer.Option(help="Most messages per chat request [1024].")] = None,
    max_stop_sequences: Annotated[int | None, typer.Option(help="Most stop strings per request [4].")] = None,
    max_stop_length: Annotated[int | None, typer.Option(help="Longest stop string [256].")] = None,
    max_n: Annotated[int | None, typer.Option(help="Largest n [16].")] = None,
    drain_timeout: Annotated[float | None, typer.Option(help="Seconds to finish requests on SIGTERM [30].")] = None,
    log_prompts: Annotated[bool | None, typer.Option(help="Log prompt text.")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    ssl_ca_certs: Annotated[Path | None, typer.Option(help="CA bundle; requires client certificates.")] = None,
    profile: Annotated[str | None, _PROFILE] = None,
    offline: Annotated[bool | None, _OFFLINE] = None,
    catalog_dir: Annotated[Path | None, _CATALOG] = None,
) -> None:
    """Serve models over an OpenAI-compatible HTTP API."""
    settings = _settings(
        model=model or None,
        host=host,
        port=port,
        served_model_name=served_model_name or None,
        context_length=context_length,
        parallel=parallel,
        threads=threads,
        batch_size=batch_size,
        embedding_model=embedding_model,
        rerank_model=rerank_model,
        encoder_max_batch=encoder_max_batch,
        encoder_max_wait_ms=encoder_max_wait_ms,
        encoder_workers=encoder_workers,
        prefill_chunk=prefill_chunk,
        prefix_cache=prefix_cache,
        playground=playground,
        log_level=log_level,
        log_format=log_format,
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
        log_prompts=log_prompts,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        ssl_ca_certs=ssl_ca_certs,
        profile=profile,
        offline=offline,
        catalog_dir=catalog_dir,
    )
    if len(settings.served_model_name) > len(settings.model):
        _fail(f"{len(settings.served_model_name)} served model names for {len(settings.model)} models")
    # Imported here so `microserve version` and `--help` stay fast.
    import ssl

    import uvicorn

    from microserve.server.app import create_app
    from microserve.server.auth import KeyFileError
    from microserve.server.drain import DrainingServer
    from microserve.server.logging import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    if (settings.ssl_certfile is None) != (settings.ssl_keyfile is None):
        _fail("--ssl-certfile and --ssl-keyfile go together")
    if settings.ssl_ca_certs is not None and settings.ssl_certfile is None:
        _fail("--ssl-ca-certs needs --ssl-certfile and --ssl-keyfile")

    resolved = _resolve_all(settings)
    try:
        application = create_app(settings, resolved)
    except KeyFileError as exc:
        _fail(str(exc))
    sock = _bind(settings.host, settings.port)
    config = uvicorn.Config(
        application,
        log_level=settings.log_level,
        log_config=None,  # keep the handlers configure_logging set (text or JSON lines)
        access_log=False,
        # Nothing reads the client address, so rewriting it from X-Forwarded-For is work for nothing.
        proxy_headers=False,
        # The drain has already waited for in-flight requests; this only bounds closing idle connections.
        timeout_graceful_shutdown=5,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        ssl_ca_certs=str(settings.ssl_ca_certs) if settings.ssl_ca_certs else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if settings.ssl_ca_certs else ssl.CERT_NONE,
    )
    scheme = "https" if settings.ssl_certfile else "http"
    names = ", ".join(f"{r.name} ({r.profile.id})" for r in resolved)
    typer.echo(f"microserve {__version__}: serving {names} on {scheme}://{settings.host}:{settings.port}")
    server = DrainingServer(config, application.state.drain, settings.drain_timeout)
    server.run(sockets=[sock])


def _resolve_all(settings: Settings) -> list[Any]:
    from microserve import hardware
    from microserve.catalog.manifest import Task
    from microserve.catalog.resolve import plan_encoder, plan_model, resolve_encoder, resolve_model
    from microserve.profiles import ProfileError
    from microserve.store import ArtifactError, ModelStore

    store = ModelStore(settings.cache_dir, offline=settings.offline)
    machine = hardware.probe()
    try:
        plans = [plan_model(m, settings.catalog_dir) for m in settings.model]
        # The embedding and rerank models are served beside the --model ones, unless a --model already serves them.
        wanted: list[tuple[str | None, Task]] = [
            (settings.embedding_model, "embedding"),
            (settings.rerank_model, "ranking"),
        ]
        encoders = [(spec, task) for spec, task in wanted if spec]
        encoder_plans = [plan_encoder(spec, task, settings.catalog_dir) for spec, task in encoders]
        served_ids = {p.id for p in plans}
        if settings.profile:
            # A forced profile applies to each served model that has it; one that none has is a mistake.
            plans = plans + encoder_plans
            if not any(p.profile(settings.profile) for p in plans):
                known = "; ".join(f"{p.id}: {', '.join(x.id for x in p.profiles)}" for p in plans)
                _fail(f"no served model has a profile `{settings.profile}` ({known})")
        resolved = []
        for index, spec in enumerate(settings.model):
            names = settings.served_model_name
            plan = plan_model(spec, settings.catalog_dir)
            forced = settings.profile if settings.profile and plan.profile(settings.profile) else None
            resolved.append(
                resolve_model(
                    spec,
                    store,
                    names[index] if index < len(names) else None,
                    hardware=machine,
                    profile=forced,
                    catalog_dir=settings.catalog_dir,
                )
            )
        for (spec, task), plan in zip(encoders, encoder_plans, strict=True):
            if plan.id in served_ids:
                continue
            forced = settings.profile if settings.profile and plan.profile(settings.profile) else None
            resolved.append(
                resolve_encoder(
                    spec,
                    store,
                    task,
                    hardware=machine,
                    profile=forced,
                    catalog_dir=settings.catalog_dir,
                )
            )
    except (ArtifactError, ProfileError, OSError) as exc:
        _fail(str(exc))
    seen = [r.name for r in resolved]
    duplicates = sorted({n for n in seen if seen.count(n) > 1})
    if duplicates:
        _fail(f"two served models are called {', '.join(duplicates)}; give each a --served-model-name")
    return resolved


@app.command()
def version() -> None:
    """Print the package version and the engine library's version."""
    try:
        import llama_cpp

        engine = f"llama-cpp-python {llama_cpp.__version__}"
    except ImportError:  # pragma: no cover - the dependency is mandatory
        engine = "llama-cpp-python missing"
    typer.echo(f"microserve {__version__} ({engine})")


from microserve.cli_models import register as _register_model_commands  # noqa: E402

_register_model_commands(app, _settings, _fail)
from microserve.cli_chat import register as _register_chat  # noqa: E402

_register_chat(app, _settings, _fail, _resolve_all)


def main() -> None:
    """Console-script entry point."""
    app()
