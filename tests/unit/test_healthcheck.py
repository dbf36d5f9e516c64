"""``python -m microserve.healthcheck``, the container's HEALTHCHECK: the URL it derives from the settings, and its
exit status against an HTTP server that answers ready or not."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from microserve.healthcheck import main, ready_url
from microserve.settings import Settings


def test_url_follows_port_host_and_scheme() -> None:
    assert ready_url(Settings(host="0.0.0.0")) == "http://127.0.0.1:8000/v1/health/ready"
    assert ready_url(Settings(host="::", port=9000)) == "http://[::1]:9000/v1/health/ready"
    assert ready_url(Settings(host="10.1.2.3", port=81)) == "http://10.1.2.3:81/v1/health/ready"
    tls = Settings(host="0.0.0.0", ssl_certfile=Path("c.pem"), ssl_keyfile=Path("k.pem"))
    assert ready_url(tls) == "https://127.0.0.1:8000/v1/health/ready"


def test_url_reads_nim_and_microserve_port_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIM_SERVER_PORT", "8123")
    assert ready_url(Settings()).endswith(":8123/v1/health/ready")
    monkeypatch.setenv("MICROSERVE_PORT", "8124")
    assert ready_url(Settings()).endswith(":8124/v1/health/ready")


@dataclass
class Health:
    """What the stand-in server answers, and the paths it was asked."""

    status: int = 503
    paths: list[str] = field(default_factory=list)


@pytest.fixture
def health_server() -> Iterator[tuple[int, Health]]:
    state = Health()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.paths.append(self.path)
            body = b'{"object":"health.response","message":"x"}'
            self.send_response(state.status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], state
    server.shutdown()
    server.server_close()


def test_exit_status_follows_readiness(
    health_server: tuple[int, Health], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port, state = health_server
    monkeypatch.setenv("MICROSERVE_HOST", "0.0.0.0")
    monkeypatch.setenv("NIM_SERVER_PORT", str(port))
    assert main([]) == 1
    assert "503" in capsys.readouterr().out
    state.status = 200
    assert main([]) == 0
    assert state.paths == ["/v1/health/ready", "/v1/health/ready"]


def test_nothing_listening_is_unhealthy(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MICROSERVE_PORT", str(port))
    assert main(["1"]) == 1
    assert f"127.0.0.1:{port}" in capsys.readouterr().out


def test_invalid_settings_are_unhealthy_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MICROSERVE_PORT", "not-a-port")
    assert main([]) == 1
    assert "port" in capsys.readouterr().out
