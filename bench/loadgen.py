"""Closed-loop streaming load generator for OpenAI-compatible servers, plus server process helpers.

``run_load`` drives ``/v1/completions`` with ``stream: true`` from ``concurrency`` workers that each loop
until a shared pool of ``n_requests`` is exhausted (closed loop: a worker sends its next request as soon as
the previous one finishes). Per request it records the time to first token (first non-empty text chunk),
every inter-token gap (between successive non-empty text chunks) and the completion token count; per run
it reports aggregate output tok/s and TTFT/ITL percentiles.

``start_server``/``stop_server`` (or the ``running_server`` context manager) launch a server subprocess,
poll a health URL until it answers 200, and shut it down with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx


@dataclass
class RequestResult:
    """Timing of one streamed completion request (times in seconds, ``perf_counter`` clock)."""

    start: float
    end: float
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    content_chunks: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the request completed without error."""
        return self.error is None


@dataclass
class LoadResult:
    """Aggregate of one closed-loop run at a fixed concurrency (latencies in milliseconds)."""

    concurrency: int
    n_requests: int
    n_ok: int
    n_failed: int
    wall_s: float
    completion_tokens: int
    tok_s: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    itl_p50_ms: float
    itl_p90_ms: float
    # Completion tokens per content chunk: above 1 where the server sent several tokens in one chunk.
    tokens_per_chunk: float = math.nan
    errors: list[str] = field(default_factory=list)
    requests: list[RequestResult] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """Return the aggregate figures as a JSON-ready dict (without the per-request records)."""
        data = asdict(self)
        data.pop("requests")
        return data


def percentile(values: Sequence[float], q: float) -> float:
    """Return the ``q``-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _chunk_text(event: Mapping[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    # /v1/completions streams "text"; accept chat-style deltas too so a misrouted server still measures.
    text = choice.get("text")
    if text is None:
        text = (choice.get("delta") or {}).get("content")
    return text or ""


async def _one_request(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(start=start, end=start)
    last: float | None = None
    usage_tokens: int | None = None
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {body[:300]}"
                return result
            async for line in resp.aiter_lines():
                # Timestamp before parsing so JSON decoding cost is not attributed to the server.
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"stream error: {json.dumps(event['error'])[:300]}"
                    return result
                usage = event.get("usage")
                if isinstance(usage, Mapping) and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
                if not _chunk_text(event):
                    continue
                result.content_chunks += 1
                if last is None:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        result.end = time.perf_counter()
    result.completion_tokens = usage_tokens if usage_tokens is not None else result.content_chunks
    if result.ttft is None:
        result.error = "no content received"
    return result


async def run_load(
    base_url: str,
    model: str,
    prompt: str | Sequence[str],
    concurrency: int,
    n_requests: int,
    max_tokens: int = 64,
    *,
    temperature: float = 0.0,
    ignore_eos: bool = True,
    extra_body: Mapping[str, Any] | None = None,
    timeout_s: float = 600.0,
) -> LoadResult:
    """Run ``n_requests`` streamed completions from ``concurrency`` closed-loop workers.

    ``prompt`` may be a list, in which case request ``i`` uses ``prompt[i % len(prompt)]`` (useful to
    defeat a server's prompt cache). ``extra_body`` is merged into every request payload. Throughput is
    total completion tokens of successful requests over the wall time from the first send to the last end.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("prompt must not be empty")
    url = base_url.rstrip("/") + "/v1/completions"
    base_payload: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        # Count tokens from the usage the server reports: a server that sends several tokens in one chunk (as
        # microserve does when its stream runs behind the engine) would be undercounted by its chunks.
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        base_payload["ignore_eos"] = True
    if extra_body:
        base_payload.update(extra_body)

    next_index = 0
    results: list[RequestResult] = []

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        # Single-threaded event loop: claiming an index needs no lock as there is no await in between.
        while next_index < n_requests:
            i = next_index
            next_index += 1
            payload = {**base_payload, "prompt": prompts[i % len(prompts)]}
            results.append(await _one_request(client, url, payload))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        t1 = time.perf_counter()

    return _summarise(results, concurrency, n_requests, t0, t1)


async def run_payloads(
    base_url: str,
    path: str,
    payloads: Sequence[Mapping[str, Any]],
    concurrency: int,
    *,
    timeout_s: float = 600.0,
) -> LoadResult:
    """Send every payload once, streamed, to ``path`` from ``concurrency`` closed-loop workers, in list order.

    Unlike :func:`run_load` each request carries its own body (prompt, length, sampling), so a mixed load is the
    same list for every server it is run against. Completion tokens come from the streamed usage when the payload
    asks for it (``stream_options.include_usage``): a server that coalesces tokens into fewer chunks is not
    undercounted.
    """
    if not payloads:
        raise ValueError("no payloads")
    url = base_url.rstrip("/") + path
    next_index = 0
    results: list[RequestResult] = []

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < len(payloads):
            i = next_index
            next_index += 1
            results.append(await _one_request(client, url, dict(payloads[i])))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s, connect=30.0)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        t1 = time.perf_counter()
    return _summarise(results, concurrency, len(payloads), t0, t1)


def _summarise(results: list[RequestResult], concurrency: int, n_requests: int, t0: float, t1: float) -> LoadResult:
    ok = [r for r in results if r.ok]
    wall = (max(r.end for r in results) - t0) if results else t1 - t0
    tokens = sum(r.completion_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [gap for r in ok for gap in r.itls]
    return LoadResult(
        concurrency=concurrency,
        n_requests=n_requests,
        n_ok=len(ok),
        n_failed=len(results) - len(ok),
        wall_s=wall,
        completion_tokens=tokens,
        tok_s=tokens / wall if wall > 0 else math.nan,
        ttft_p50_ms=percentile(ttfts, 50) * 1e3,
        ttft_p90_ms=percentile(ttfts, 90) * 1e3,
        itl_p50_ms=percentile(itls, 50) * 1e3,
        itl_p90_ms=percentile(itls, 90) * 1e3,
        tokens_per_chunk=tokens / chunks if (chunks := sum(r.content_chunks for r in ok)) else math.nan,
        errors=sorted({r.error for r in results if r.error}),
        requests=results,
    )


# --------------------------------------------------------------------------------------------------
# Server subprocess helpers
# --------------------------------------------------------------------------------------------------


class KeepAliveClient:
    """One HTTP/1.1 keep-alive connection that POSTs JSON and reads whole replies, with as little client work as
    asyncio allows.

    On a machine whose cores the server also needs, a load generator's own CPU time comes out of the server's
    throughput; a full-featured client (httpx spends ~4 ms of CPU per request) can cost more than the work being
    measured. This one writes the request bytes directly and reads ``Content-Length`` or chunked bodies, as a
    ``wrk``-style generator does.
    """

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, payload: Mapping[str, Any]) -> tuple[int, bytes]:
        """POST ``payload`` as JSON to ``path``; the status code and the body."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        body = json.dumps(payload).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self._writer.write(head.encode() + body)
        # One read for the whole header block: each await costs the client more CPU than parsing a few lines.
        lines = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length, chunked, close = 0, False, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection" and value == "close":
                close = True
        if chunked:
            parts = []
            while size := int((await self._reader.readline()).split(b";")[0], 16):
                parts.append(await self._reader.readexactly(size))
                await self._reader.readline()
            await self._reader.readline()
            data = b"".join(parts)
        else:
            data = await self._reader.readexactly(length)
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        """Close the connection (the next ``post`` opens a new one)."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class ServerStartError(RuntimeError):
    """Raised when a server process exits or fails to become ready in time."""


@dataclass
class ServerProcess:
    """A server subprocess started by ``start_server``."""

    name: str
    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path | None = None
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    def log_tail(self, n_lines: int = 30) -> str:
        """Return the last lines of the server's log, if it was logged to a file."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n_lines:])


def microserve_cmd(port: int, *args: str) -> list[str]:
    """``microserve serve`` on ``port`` with ``args``, serving its chat model alone (no embedding model), as the
    peers it is compared with serve one model."""
    return [sys.executable, "-m", "microserve", "serve", "--port", str(port), "--embedding-model", "none", *args]


def free_port() -> int:
    """Return a TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(health_url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> float:
    """Poll ``health_url`` until it returns 200; return the seconds waited.

    Raises ``ServerStartError`` on timeout or, when ``proc`` is given, as soon as the process exits.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    last_status = "no response"
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise ServerStartError(f"process exited with code {proc.returncode} before becoming ready")
            try:
                resp = client.get(health_url)
                if resp.status_code == 200:
                    return time.monotonic() - started
                # llama-server answers 503 while the model loads: keep polling.
                last_status = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                last_status = type(exc).__name__
            time.sleep(0.25)
    raise ServerStartError(f"not ready after {timeout_s:.0f}s (last: {last_status}) at {health_url}")


def start_server(
    name: str,
    cmd: Sequence[str],
    base_url: str,
    health_url: str,
    *,
    timeout_s: float = 180.0,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """Start ``cmd`` and wait until ``health_url`` answers 200.

    Output goes to ``log_path`` (or is discarded). On failure the process is stopped and
    ``ServerStartError`` is raised with the tail of the log.
    """
    log_file: IO[bytes] | None = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # Closed by stop_server: the file must outlive this function.
        log_file = open(log_path, "wb")
    full_env = {**os.environ, **(env or {})}
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdout=log_file if log_file is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            env=full_env,
            # Own session so stop_server can signal the server and any children it spawns, and so a
            # Ctrl-C in the terminal reaches only the harness, which then shuts the server down itself.
            start_new_session=True,
        )
    except OSError as exc:
        if log_file is not None:
            log_file.close()
        raise ServerStartError(f"{name}: cannot start {cmd[0]}: {exc}") from exc
    server = ServerProcess(name=name, proc=proc, base_url=base_url, log_path=log_path, _log_file=log_file)
    try:
        wait_ready(health_url, timeout_s, proc)
    except ServerStartError as exc:
        stop_server(server)
        tail = server.log_tail()
        raise ServerStartError(f"{name}: {exc}" + (f"\n--- log tail ---\n{tail}" if tail else "")) from None
    return server


def stop_server(server: ServerProcess, grace_s: float = 15.0) -> int | None:
    """Stop the server: SIGTERM to its process group, then SIGKILL after ``grace_s``; return its exit code."""
    proc = server.proc
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    if server._log_file is not None:
        server._log_file.close()
        server._log_file = None
    return proc.returncode


@contextlib.contextmanager
def running_server(
    name: str,
    cmd: Sequence[str],
    base_url: str,
    health_url: str,
    **kwargs: Any,
) -> Iterator[ServerProcess]:
    """Context manager around ``start_server``/``stop_server``."""
    server = start_server(name, cmd, base_url, health_url, **kwargs)
    try:
        yield server
    finally:
        stop_server(server)
