"""The README's first command, `make serve`, starts a server that answers a chat request."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx
from conftest import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]


def test_make_serve_answers_a_chat_request(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "make-serve.log"
    env = {**os.environ, "MICROSERVE_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    # A session of its own, so that stopping make also stops the server it started.
    process = subprocess.Popen(
        ["make", "-C", str(ROOT), "serve"], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}", 180, process, log)
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={
                "model": "smollm2-135m-instruct",
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "What is the capital of France?"},
                ],
                "max_tokens": 32,
                "temperature": 0,
            },
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert "Paris" in response.json()["choices"][0]["message"]["content"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
