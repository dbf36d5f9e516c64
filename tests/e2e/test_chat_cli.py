"""``microserve chat`` in a real terminal (a pty, driven by pexpect): turns with history, /reset, /model, Ctrl-C
during a reply, /exit; against a running server (with and without its API key) and against one it starts itself."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest
from conftest import Server, start_server
from tiny_gguf import write_tiny_llama

MODEL = "smollm2-135m-instruct"
KEY = "sk-chat"
PROMPT = ">>> "
STATS = re.compile(r"(\d+) prompt tokens · (\d+) completion tokens")


def spawn(*args: str, env: dict[str, str] | None = None) -> pexpect.spawn:
    inherited = {k: v for k, v in os.environ.items() if k != "MICROSERVE_API_KEY"}
    full_env = {**inherited, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1", "TERM": "xterm", **(env or {})}
    return pexpect.spawn(
        sys.executable,
        ["-m", "microserve", "chat", *args],
        env=full_env,
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )


def turn(child: pexpect.spawn, text: str) -> tuple[int, int]:
    """Send one message and wait for its reply's stats line; (prompt tokens, completion tokens)."""
    child.sendline(text)
    child.expect(STATS)
    prompt, completion = int(child.match.group(1)), int(child.match.group(2))
    child.expect_exact(PROMPT)
    return prompt, completion


def running(server: Server) -> float:
    for line in httpx.get(f"{server.v1}/metrics", timeout=10).text.splitlines():
        if line.startswith(f'num_requests_running{{model_name="{MODEL}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no num_requests_running sample")


def test_turns_keep_history_reset_forgets_ctrl_c_stops_a_reply_and_exit_leaves(smollm: Server) -> None:
    child = spawn("--url", smollm.url, "--temperature", "0", "--max-tokens", "400")
    try:
        child.expect(f"microserve chat.*with {MODEL} at {re.escape(smollm.url)}")
        child.expect_exact(PROMPT)
        first_prompt, first_reply = turn(child, "What is the capital of France?")
        second_prompt, _ = turn(child, "And what is the capital of Italy?")
        # The second request carried the first question and its answer.
        assert second_prompt > first_prompt + first_reply, (first_prompt, first_reply, second_prompt)

        child.sendline("/reset")
        child.expect_exact("conversation cleared")
        child.expect_exact(PROMPT)
        alone, _ = turn(child, "And what is the capital of Italy?")
        assert alone < second_prompt - first_reply  # the history is gone

        child.sendline("/system Answer in French.")
        child.expect_exact("system prompt set")
        child.expect_exact(PROMPT)
        with_system, _ = turn(child, "Hi")
        child.sendline("/reset")
        child.expect_exact(PROMPT)
        child.sendline("/system")
        child.expect_exact("system prompt cleared")
        child.expect_exact(PROMPT)
        without, _ = turn(child, "Hi")
        assert with_system > without

        child.sendline("/model nonexistent")
        child.expect_exact("no model `nonexistent` is served here")
        child.expect_exact(PROMPT)

        # Ctrl-C while the answer streams: the reply stops, the server frees the sequence, the chat goes on.
        child.sendline("/reset")
        child.expect_exact(PROMPT)
        child.sendline("Write a very long story about a dragon who learns to fly.")
        child.expect_exact("who learns to fly.\r\n")  # the terminal's echo of the line
        child.expect(r"\S+ +\S+")  # the reply has begun to stream
        # Interrupt while the server still decodes it (a busy machine may render the terminal's words late).
        deadline = time.monotonic() + 30
        while running(smollm) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child.sendintr()
        child.expect(r"~?\d+ completion tokens.*stopped")
        child.expect_exact(PROMPT)
        deadline = time.monotonic() + 10
        while running(smollm) != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running(smollm) == 0
        assert child.isalive()
        turn(child, "Thanks.")

        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = Path(tmp_path_factory.mktemp("chat-keys"))
    tiny = write_tiny_llama(tmp / "tiny.gguf")
    server = start_server(
        tmp, "--model", str(tiny), "--served-model-name", "tiny", "--embedding-model", "none",
        env={"MICROSERVE_API_KEYS": KEY},
    )  # fmt: skip
    yield server
    server.stop()


def test_a_server_with_keys_needs_one_and_takes_it_from_the_environment(keyed: Server) -> None:
    refused = spawn("--url", keyed.url)
    refused.expect(pexpect.EOF)
    refused.close()
    assert refused.exitstatus == 2
    assert "refused the request (Missing API key" in refused.before and "--api-key" in refused.before

    wrong = spawn("--url", keyed.url, "--api-key", "sk-wrong")
    wrong.expect(pexpect.EOF)
    wrong.close()
    assert wrong.exitstatus == 2 and "Incorrect API key" in wrong.before

    child = spawn("--url", keyed.url, "--max-tokens", "8", env={"MICROSERVE_API_KEY": KEY})
    try:
        child.expect_exact(PROMPT)
        turn(child, "hello")
        child.sendline("/model")
        child.expect_exact("models: tiny")
        child.expect_exact(PROMPT)
        child.sendeof()  # Ctrl-D leaves too
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_without_url_it_serves_the_default_model_itself() -> None:
    child = spawn("--temperature", "0", "--max-tokens", "16")
    try:
        child.expect(f"microserve chat.*with {MODEL} at http://127\\.0\\.0\\.1:\\d+", timeout=180)
        child.expect_exact(PROMPT)
        turn(child, "What is the capital of France?")
        child.sendline("/exit")
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
