"""Run llama.cpp's own server tests of the Anthropic Messages and Responses compatibility against microserve.

The tests (``tools/server/tests/unit/test_compat_anthropic.py`` and ``test_compat_oai_responses.py``) come from
the llama-cpp-python sdist that the project pins, downloaded from PyPI and unpacked in the benchmark cache as
``bench/peers.py`` does; nothing of them is kept in this repository. They run in their own harness's external-server
mode (``DEBUG_EXTERNAL``) against ``microserve serve`` on a free port, with two adjustments made by a plugin written
here: every request names the served model (the tests send ``test`` and ``gpt-4.1``, which llama-server ignores and
microserve answers with 404), and the one check of a model's own words (``(Suddenly)+``, what llama.cpp's 260K-
parameter stories model writes) accepts any non-empty text. Tests of llama-server-only behaviour are deselected,
each with its reason (``EXCLUDED``).

    .venv/bin/python bench/llama_server_compat.py [--model smollm2-135m-instruct]

Needs the ``bench`` extra (requests, wget, filelock: the harness imports them) and pytest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from peers import _fetch_source, peer_paths, pinned_version

SERVE = ("--embedding-model", "none", "--parallel", "2")
FILES = ("unit/test_compat_anthropic.py", "unit/test_compat_oai_responses.py")
EXCLUDED = {
    "test_anthropic_empty_messages": "expects 200 for an empty `messages`; Anthropic's API answers 400, as "
    "microserve does",
    "test_anthropic_tool_result_with_image": "expects status 500 for an image to a text model; microserve answers 400 "
    "(the client's error) with the same 'image input is not supported' message",
    "test_anthropic_vision_format_accepted": "the same: expects 500 where microserve answers 400",
    "test_anthropic_vision_base64_with_multimodal_model": "downloads a vision model from the Hub",
    "test_anthropic_thinking_history_in_count_tokens": "needs a Qwen3 template file from llama.cpp's repository",
    "test_anthropic_thinking_history_in_template": "llama-server's /apply-template route with a Qwen3 template file",
    "test_anthropic_thinking_with_reasoning_model": "downloads a 7B reasoning model from the Hub",
    "test_responses_stream_with_llama_telemetry": "llama-server's own `timings` and `prompt_progress` fields",
}

PLUGIN = '''
"""Written by microserve's bench/llama_server_compat.py: name the served model in every request."""
import os

import utils
from openai.resources.responses import Responses

MODEL = os.environ["MICROSERVE_COMPAT_MODEL"]


def _named(data):
    return {**data, "model": MODEL} if isinstance(data, dict) else data


_request = utils.ServerProcess.make_request
_stream = utils.ServerProcess.make_stream_request
utils.ServerProcess.make_request = lambda self, method, path, data=None, *a, **k: _request(
    self, method, path, _named(data), *a, **k
)
utils.ServerProcess.make_stream_request = lambda self, method, path, data=None, *a, **k: _stream(
    self, method, path, _named(data), *a, **k
)
_create = Responses.create
Responses.create = lambda self, *a, **k: _create(self, *a, **{**k, "model": MODEL})
_match = utils.match_regex


def _relaxed(regex, text):
    # "(Suddenly)+" is what llama.cpp's stories model writes; the API's part is that there is text.
    return bool(text.strip()) if regex == "(Suddenly)+" else _match(regex, text)


def pytest_collection_modifyitems(items):
    for item in items:
        if getattr(item.module, "match_regex", None) is _match:
            item.module.match_regex = _relaxed
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"microserve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/v1/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("microserve did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    paths = peer_paths(pinned_version())
    llama_dir = _fetch_source(paths.version, paths.root, lambda msg: print(f"[compat] {msg}", file=sys.stderr))
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        tests = Path(tmp) / "tests"
        shutil.copytree(llama_dir / "tools" / "server" / "tests", tests)
        (tests / "microserve_plugin.py").write_text(PLUGIN)
        log = (Path(tmp) / "server.log").open("wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "microserve", "serve", "--port", str(port), "--model", args.model, *SERVE],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_ready(f"http://127.0.0.1:{port}", server)
            deselect = " and ".join(f"not {name}" for name in EXCLUDED)
            env = {
                **os.environ,
                "DEBUG_EXTERNAL": "1",
                "PORT": str(port),
                "MICROSERVE_COMPAT_MODEL": args.model,
                "PYTHONPATH": f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            }
            command = [sys.executable, "-m", "pytest", *FILES, "-p", "microserve_plugin", "-k", deselect]
            rc = subprocess.run([*command, "-q", "-rA", "-p", "no:cacheprovider"], cwd=tests, env=env).returncode
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()
    print("\nDeselected (llama-server-specific or needing downloads):")
    for name, reason in EXCLUDED.items():
        print(f"  {name}: {reason}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
