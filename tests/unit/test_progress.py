"""Progress of a wait: a bar only on a terminal that no JSON log writes to; log lines otherwise."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from microserve.progress import Progress, bars_fit
from microserve.server.logging import JsonFormatter, TextFormatter


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@contextmanager
def stderr_logging(monkeypatch: pytest.MonkeyPatch, formatter: logging.Formatter | None) -> Iterator[Terminal]:
    """stderr a terminal, and the root log (only) on it with ``formatter``; set inside the test, since pytest's
    capture puts its own stderr back between a fixture's setup and the test."""
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    root = logging.getLogger()
    handlers: list[logging.Handler] = []
    if formatter is not None:
        handler = logging.StreamHandler(screen)
        handler.setFormatter(formatter)
        handlers.append(handler)
    monkeypatch.setattr(root, "handlers", handlers)
    monkeypatch.setattr(root, "level", logging.INFO)
    yield screen


def test_a_terminal_with_text_logs_gets_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    with stderr_logging(monkeypatch, TextFormatter("%(message)s")):
        assert bars_fit()


def test_json_logs_on_the_terminal_get_json_lines_instead_of_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    with stderr_logging(monkeypatch, JsonFormatter()) as screen:
        assert not bars_fit()
        with Progress("m.gguf", 100, action="deriving", finished="derived", unit="tensors") as bar:
            for _ in range(10):
                bar.advance(10)
    records = [json.loads(line) for line in screen.getvalue().splitlines()]  # all JSON: no bar drawn between
    messages = [r["message"] for r in records]
    assert messages[0] == "deriving m.gguf (100 tensors)"
    assert messages[1:-1] == [f"deriving m.gguf: {p}% ({p}/100 tensors)" for p in range(10, 101, 10)]
    assert messages[-1].startswith("derived m.gguf: 100 tensors in ")


def test_no_terminal_no_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    with stderr_logging(monkeypatch, None):
        monkeypatch.setattr(sys, "stderr", io.StringIO())
        assert not bars_fit()
