"""The CLI's own errors: one line and exit code 2."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from microserve import __version__


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "microserve", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_version() -> None:
    result = run_cli("version")
    assert result.returncode == 0
    assert __version__ in result.stdout and "llama-cpp-python" in result.stdout


def test_missing_model_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("serve", "--model", str(tmp_path / "absent.gguf"))
    assert result.returncode == 2
    assert "absent.gguf" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_non_gguf_file_exits_2(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_text("not a model")
    result = run_cli("serve", "--model", str(bogus))
    assert result.returncode == 2 and "not a GGUF" in result.stderr


def test_port_in_use_exits_2() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--port", str(port))
    assert result.returncode == 2
    # One error line, the last: before it only the placement's own progress lines (the files checked).
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]] and f"cannot listen on 127.0.0.1:{port}" in lines[-1], lines
