"""llama.cpp's log, routed through microserve: errors to stderr (everything at debug level), a thread's warnings
and errors captured while it does something whose failure reason llama.cpp only logs (parsing a grammar, loading an
adapter), and the quantizer's per-tensor lines turned into progress."""

from __future__ import annotations

import ctypes
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import llama_cpp as L

log = logging.getLogger(__name__)
_captured = threading.local()
# llama_model_quantize logs "[   7/ 272]                 blk.0.attn_q.weight - [...], type = q4_1, " per tensor.
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


@L.llama_log_callback
def _log_callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace") if text else ""
    report: Callable[[int, int], None] | None = getattr(_captured, "tensors", None)
    if report is not None and level == 2 and (match := _TENSOR_LINE.match(message)):
        report(int(match[1]) - 1, int(match[2]))  # logged as the tensor's conversion starts
        return
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


@contextmanager
def tensor_progress(report: Callable[[int, int], None]) -> Iterator[None]:
    """Call ``report(done, total)`` as llama.cpp's quantizer, on this thread, starts on each tensor."""
    _captured.tensors = report
    try:
        yield
    finally:
        _captured.tensors = None
