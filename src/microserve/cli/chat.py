"""``microserve chat``: an interactive terminal chat, streamed, against a running server or one started here.

Without ``--url`` the default chat model (or ``--model``) is served in this process, on a free loopback port,
by a uvicorn server in a background thread; with ``--url`` the chat talks to that server with ``--api-key`` (or
``MICROSERVE_API_KEY``). Ctrl-C stops the reply being streamed (the connection closes, so the server frees the
sequence) and the chat goes on; ``/exit`` or Ctrl-D leaves.
"""

from __future__ import annotations

import inspect
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from microserve.cli.options import fail, with_settings
from microserve.settings import Settings

if TYPE_CHECKING:
    import httpx
    from rich.console import Console

_ENCODER_TASKS = ("embedding", "ranking")
_HELP = (
    "/system TEXT  set the system prompt (no text: clear it)\n"
    "/model NAME   chat with another served model (no name: list them)\n"
    "/reset        start the conversation again\n"
    "/exit         leave (Ctrl-D too); Ctrl-C stops a reply"
)


@dataclass
class Conversation:
    """What the next request sends: the model, the system prompt, the turns so far and the sampling fields."""

    model: str
    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict[str, str]]:
        """The messages of the next request."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns


@dataclass
class Reply:
    """One streamed answer: its text, counts and timing; ``stopped`` when Ctrl-C ended it."""

    text: str = ""
    chunks: int = 0
    usage: dict[str, int] | None = None
    finish: str | None = None
    started: float = 0.0
    first: float | None = None
    last: float | None = None
    stopped: bool = False
    error: str | None = None

    def stats(self) -> str:
        """A one-line summary: tokens, speed, time to first token, how it ended."""
        parts = []
        completion = self.usage["completion_tokens"] if self.usage else self.chunks
        if self.usage:
            parts.append(f"{self.usage['prompt_tokens']} prompt tokens")
        parts.append(f"{'' if self.usage else '~'}{completion} completion tokens")
        if self.first is not None and self.last is not None and completion > 1 and self.last > self.first:
            parts.append(f"{(completion - 1) / (self.last - self.first):.1f} tok/s")
        if self.first is not None:
            parts.append(f"first token {1000 * (self.first - self.started):.0f} ms")
        if self.stopped:
            parts.append("stopped")
        elif self.finish and self.finish != "stop":
            parts.append(f"finish: {self.finish}")
        return " · ".join(parts)


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text or f"HTTP {response.status_code}"


def stream_reply(client: httpx.Client, conversation: Conversation, show: Callable[[str], None]) -> Reply:
    """Send the conversation, show each piece of the answer as it arrives, and return the reply.

    A KeyboardInterrupt while streaming closes the response (and so the connection: the server sees the client
    leave) and comes back as ``stopped``.
    """
    body = {
        "model": conversation.model,
        "messages": conversation.messages(),
        "stream": True,
        "stream_options": {"include_usage": True},
        **conversation.sampling,
    }
    reply = Reply(started=time.monotonic())
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                reply.error = f"HTTP {response.status_code}: {_error_message(response)}"
                return reply
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    reply.error = str(event["error"].get("message", event["error"]))
                    break
                if event.get("usage"):
                    reply.usage = event["usage"]
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        now = time.monotonic()
                        reply.first = now if reply.first is None else reply.first
                        reply.last = now
                        reply.chunks += 1
                        reply.text += piece
                        show(piece)
                    if choice.get("finish_reason"):
                        reply.finish = choice["finish_reason"]
    except KeyboardInterrupt:
        reply.stopped = True
    return reply


def chat_models(client: httpx.Client) -> list[str]:
    """The served models one can chat with (encoders left out)."""
    response = client.get("/v1/models")
    if response.status_code != 200:
        raise ChatError(response.status_code, _error_message(response))
    return [card["id"] for card in response.json()["data"] if card.get("task") not in _ENCODER_TASKS]


class ChatError(Exception):
    """The server refused a request the chat needs (models list)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def run_repl(console: Console, client: httpx.Client, conversation: Conversation, where: str) -> None:
    """Read lines until /exit or end of input; commands start with a slash, anything else is a turn."""
    try:
        import readline  # noqa: F401  - line editing and arrow-key recall for input()
    except ImportError:  # pragma: no cover - not on every platform
        pass

    console.print(
        f"[bold]microserve chat[/bold] with [cyan]{conversation.model}[/cyan] at {where}\n"
        "[dim]/help lists the commands; Ctrl-C stops a reply, /exit or Ctrl-D leaves.[/dim]"
    )
    while True:
        try:
            line = console.input("[bold green]>>> [/bold green]").strip()
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print("\n[dim](/exit or Ctrl-D leaves)[/dim]")
            continue
        if not line:
            continue
        if line.startswith("/"):
            if not _command(console, client, conversation, line):
                return
            continue
        conversation.turns.append({"role": "user", "content": line})

        def show(piece: str) -> None:
            console.print(piece, end="", style="default", markup=False, highlight=False, soft_wrap=True)

        reply = stream_reply(client, conversation, show)
        if reply.text:
            console.print()
        if reply.error:
            conversation.turns.pop()
            console.print(f"[red]error:[/red] {reply.error}", highlight=False)
            continue
        # A stopped reply stays in the history as far as it got, as the model did say it.
        if reply.text:
            conversation.turns.append({"role": "assistant", "content": reply.text})
        console.print(f"[dim]{reply.stats()}[/dim]", highlight=False)


def _command(console: Console, client: httpx.Client, conversation: Conversation, line: str) -> bool:
    """Run one slash command; False means leave."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/reset":
        conversation.turns.clear()
        console.print("[dim]conversation cleared[/dim]")
    elif name == "/system":
        conversation.system = arg or None
        console.print(f"[dim]system prompt {'set' if arg else 'cleared'}[/dim]")
    elif name == "/model":
        try:
            served = chat_models(client)
        except ChatError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False)
            return True
        if not arg:
            console.print("models: " + ", ".join(f"[cyan]{m}[/cyan]" if m == conversation.model else m for m in served))
        elif arg not in served:
            console.print(f"[red]error:[/red] no model `{arg}` is served here ({', '.join(served)})", highlight=False)
        else:
            conversation.model = arg
            console.print(f"[dim]now chatting with {arg}[/dim]")
    elif name == "/help":
        console.print(_HELP, markup=False, highlight=False)
    else:
        console.print(f"[red]unknown command {name}[/red]; /help lists them", highlight=False)
    return True


@contextmanager
def local_server(settings: Settings, console: Console) -> Iterator[tuple[str, str]]:
    """Serve ``settings``' first model in this process on a free loopback port; yields (base URL, model name)."""
    import httpx
    import uvicorn

    from microserve.catalog.errors import CatalogError
    from microserve.server.app import build_app
    from microserve.server.logging import configure_logging

    configure_logging("warning", "text")
    try:
        application = build_app(settings)
    except (CatalogError, OSError) as exc:
        fail(str(exc))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(application, log_level="warning", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    # uvicorn installs no signal handlers off the main thread, so Ctrl-C stays the chat's to handle.
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="microserve-chat-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    name = application.state.plan.models[0].name
    try:
        with console.status(f"loading {name}…"):
            while True:
                if not thread.is_alive():
                    fail("the local server stopped while starting")
                try:
                    ready = httpx.get(f"{url}/v1/health/ready", timeout=5)
                except httpx.HTTPError:
                    ready = None
                if ready is not None and ready.status_code == 200:
                    break
                if ready is not None and "failed to load" in ready.text:
                    fail(_error_message(ready))
                time.sleep(0.2)
        yield url, name
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _option(name: str, default: Any, kind: Any, **option: Any) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, typer.Option(**option)]
    )


_EXTRA = [
    _option("url", None, str | None, help="A running server, e.g. http://127.0.0.1:8000 (default: serve one here)."),
    _option("api_key", None, str | None, envvar="MICROSERVE_API_KEY", help="API key for --url's server."),
    _option(
        "model",
        None,
        str | None,
        help="Model to chat with; without --url, the model to serve (default: smollm2-135m-instruct).",
    ),
    _option("system", None, str | None, help="System prompt."),
    _option("temperature", None, float | None, help="Sampling temperature (0: greedy)."),
    _option("top_p", None, float | None, help="Nucleus sampling mass."),
    _option("max_tokens", None, int | None, help="Most tokens per reply."),
]


def register(app: typer.Typer) -> None:
    """Add ``chat`` to ``app``."""

    @app.command()
    @with_settings(["cache_dir", "profile", "offline"], extra=_EXTRA)
    def chat(
        settings: Settings,
        url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        system: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        """Chat in the terminal with a served model, streamed."""
        import httpx
        from rich.console import Console

        console = Console(highlight=False)
        sampling = {
            k: v
            for k, v in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens))
            if v is not None
        }

        def talk(base: str, served: str | None, key: str | None) -> None:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            timeout = httpx.Timeout(600.0, connect=10.0)
            with httpx.Client(base_url=base, headers=headers, timeout=timeout) as client:
                try:
                    names = chat_models(client)
                except httpx.HTTPError as exc:
                    fail(f"cannot reach {base}: {exc}")
                except ChatError as exc:
                    if exc.status == 401:
                        hint = "pass --api-key or set MICROSERVE_API_KEY" if not key else "check the key"
                        fail(f"{base} refused the request ({exc}); {hint}")
                    fail(f"{base} answered {exc.status}: {exc}")
                if not names:
                    fail(f"{base} serves no chat model")
                chosen = served or names[0]
                if chosen not in names:
                    fail(f"{base} serves no model `{chosen}` ({', '.join(names)})")
                run_repl(console, client, Conversation(chosen, system, [], sampling), base)

        if url is not None:
            talk(url.rstrip("/"), model, api_key)
            return
        # Bound to loopback for this process alone: the keys a deployment sets for its server do not apply here.
        local: dict[str, Any] = {"embedding_model": None, "rerank_model": None, "log_level": "warning"}
        local["playground"] = False
        local |= {"api_keys": None, "api_key_file": None, "model": [model] if model else settings.model}
        with local_server(settings.model_copy(update=local), console) as (base, served):
            talk(base, served, None)
