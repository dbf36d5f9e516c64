"""llama.cpp's log, routed through microserve: errors to stderr (everything at debug level), and a thread's
warnings and errors captured while it does something whose failure reason llama.cpp only logs (parsing a grammar,
loading an adapter)."""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import llama_cpp as L

log = logging.getLogger(__name__)
_captured = threading.local()


@L.llama_log_callback
def _log_callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace") if text else ""
    lines: list[str] | None = getattr(_captured, "lines", None)
    # ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation.
    if lines is not None and level in (3, 4, 5):
        lines.append(message)
        return
    # Otherwise errors only, unless microserve logs at debug level.
    if level == 4 or log.isEnabledFor(logging.DEBUG):
        print(message, end="", flush=True, file=sys.stderr)


def install_log_capture() -> None:
    """Route llama.cpp's log through microserve's callback."""
    L.llama_log_set(_log_callback, ctypes.c_void_p(0))


@contextmanager
def captured() -> Iterator[list[str]]:
    """Collect this thread's llama.cpp warnings and errors while the block runs (stripped, non-empty lines)."""
    lines: list[str] = []
    _captured.lines = lines
    try:
        yield lines
    finally:
        _captured.lines = None
        lines[:] = [line.strip() for line in lines if line.strip()]
