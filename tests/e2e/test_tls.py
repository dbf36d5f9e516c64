"""HTTPS with a certificate made at test time, and mutual TLS: clients without a certificate are refused."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import free_port

MODEL = "smollm2-135m-instruct"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


OPENSSL_REQ = ("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1")


def self_signed(tmp: Path, name: str, san: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    subprocess.run(
        [
            *OPENSSL_REQ,
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName={san}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_with_client_certificates(tmp_path: Path) -> None:
    server_cert, server_key = self_signed(tmp_path, "server", "IP:127.0.0.1")
    client_cert, client_key = self_signed(tmp_path, "client", "DNS:client")
    port = free_port()
    log = tmp_path / "server.log"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "microserve", "serve", "--port", str(port), "--parallel", "1"),
            *("--ssl-certfile", str(server_cert), "--ssl-keyfile", str(server_key), "--ssl-ca-certs", str(client_cert)),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"https://127.0.0.1:{port}"
    trusted = ssl.create_default_context(cafile=str(server_cert))
    with_cert = ssl.create_default_context(cafile=str(server_cert))
    with_cert.load_cert_chain(str(client_cert), str(client_key))
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/v1/health/ready", verify=with_cert, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.25)

        with httpx.Client(verify=with_cert, timeout=60) as http:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, http_client=http)
            reply = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
            )
            assert reply.choices[0].finish_reason in ("length", "stop")
        # The server's certificate is not in the default trust store, and plain HTTP is not spoken.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/v1/health/live", timeout=10)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/v1/health/live", timeout=10)
        # Without a client certificate the handshake (or the first read) fails.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/v1/health/live", verify=trusted, timeout=10)
    finally:
        process.terminate()
        process.wait(timeout=60)
