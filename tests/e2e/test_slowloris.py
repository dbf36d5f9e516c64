"""Slow clients cannot hold the server: headers have a deadline, idle keep-alive connections close, and
connections beyond the cap are refused, while normal requests keep being served."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Server, start_server

MODEL = "smollm2-135m-instruct"
SLOW = 50


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        Path(tmp_path_factory.mktemp("slowloris")),
        "--embedding-model",
        "none",
        "--parallel",
        "2",
        "--header-timeout",
        "2",
        "--keep-alive-timeout",
        "1",
        "--max-connections",
        str(SLOW + 20),
    )
    yield server
    server.stop()


def _address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def _trickle(sock: socket.socket, closed: list[float], started: float) -> None:
    """Send a request's headers one byte a second, until the server closes the connection."""
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    sock.settimeout(1.0)
    for byte in request:
        try:
            sock.sendall(bytes([byte]))
            data = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            data = b""
        if not data or data.startswith(b"HTTP/1.1 408"):
            closed.append(time.monotonic() - started)
            return


def test_fifty_slow_header_connections_are_closed_while_normal_requests_are_served(guarded: Server) -> None:
    started = time.monotonic()
    closed: list[float] = []
    sockets = [socket.create_connection(_address(guarded)) for _ in range(SLOW)]
    threads = [threading.Thread(target=_trickle, args=(s, closed, started), daemon=True) for s in sockets]
    for thread in threads:
        thread.start()
    served = 0
    with httpx.Client(base_url=guarded.v1, timeout=30) as client:
        while time.monotonic() - started < 4:
            reply = client.post(
                "/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            )
            assert reply.status_code == 200, reply.text
            served += 1
    for thread in threads:
        thread.join(timeout=15)
    for sock in sockets:
        sock.close()
    assert served >= 1
    # Every slow connection was closed about the header timeout after it opened, not held open.
    assert len(closed) == SLOW
    assert max(closed) < 2 + 5


def _read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length: the head and the body may come in separate segments."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, data
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(guarded: Server) -> None:
    with socket.create_connection(_address(guarded)) as sock:
        sock.settimeout(10)
        started = time.monotonic()
        reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408")
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "header_timeout"
        assert sock.recv(4096) == b""
        assert 1.5 < time.monotonic() - started < 5


def test_an_idle_keep_alive_connection_is_closed(guarded: Server) -> None:
    with socket.create_connection(_address(guarded)) as sock:
        sock.settimeout(10)
        sock.sendall(b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert sock.recv(4096) == b""  # closed by the server after the keep-alive timeout (1 s)
        assert time.monotonic() - started < 4


def test_connections_beyond_the_cap_are_refused_with_503(guarded: Server) -> None:
    held = [socket.create_connection(_address(guarded)) for _ in range(SLOW + 20)]
    try:
        with socket.create_connection(_address(guarded)) as extra:
            extra.settimeout(10)
            reply = extra.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503"), reply
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "too_many_connections"
    finally:
        for sock in held:
            sock.close()
    # Once they are gone, the server serves again.
    time.sleep(0.5)
    assert httpx.get(f"{guarded.v1}/models", timeout=30).status_code == 200
