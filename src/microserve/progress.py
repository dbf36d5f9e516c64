"""Progress of one wait a user sits through (a download, a copy, a digest, a derivation, an export): a rich bar on
a terminal, log lines otherwise.

The bar goes to stderr, so that stdout stays for what a command prints. Without a terminal (a container, a test, a
pipe), or when the log on stderr is machine-read (JSON lines, which a bar's redraws would corrupt), the same progress
is told in log lines under the caller's logger: one when the work starts, one at every tenth of it when ``steps``
asks for them, and one with the time taken when it ends.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import TracebackType
from typing import Any, Literal

Unit = Literal["bytes", "tensors"]

_log = logging.getLogger(__name__)


def bars_fit() -> bool:
    """Whether a bar may be drawn on stderr: it is a terminal, and no log handler writes machine-read records there
    (a formatter says so with a true ``machine_readable`` attribute, as the JSON-lines one does)."""
    if not sys.stderr.isatty():
        return False
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if stream in (sys.stderr, sys.__stderr__) and getattr(handler.formatter, "machine_readable", False):
            return False
    return True


class Progress:
    """One wait, counted in ``unit`` towards ``total`` (None: not known yet); ``unit`` None for work that cannot
    be counted (a child process), which shows the time it has taken.

    ``action`` and ``finished`` name the work in its log lines ("copying", "copied"); ``transient`` makes the bar
    disappear when done (for checks that run on every start); ``steps`` adds a log line at every tenth.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        action: str = "downloading",
        finished: str = "downloaded",
        unit: Unit | None = "bytes",
        tty: bool | None = None,
        logger: logging.Logger | None = None,
        steps: bool = True,
        transient: bool = False,
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.action = action
        self.finished = finished
        self.unit = unit
        self._log = logger or _log
        self._steps = steps
        self._tty = bars_fit() if tty is None else tty
        self._next_tenth = 1  # in whole tenths: float steps of 0.1 skip a line (0.30000000000000004 > 0.3)
        self._started = time.monotonic()
        self._closed = False
        self._lock = threading.Lock()
        self._bar: Any = None
        self._task: Any = None
        if self._tty:
            self._start_bar(transient)
        else:
            self._log.info("%s %s%s", action, label, f" ({self._amount(total)})" if total else "")

    def _start_bar(self, transient: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        counted: tuple[Any, ...]
        if self.unit is None:
            counted = (TimeElapsedColumn(),)
        elif self.unit == "bytes":
            counted = (DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        else:
            counted = (MofNCompleteColumn(), TextColumn(self.unit), TimeElapsedColumn())
        columns = (
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            *(() if self.unit is None else (TaskProgressColumn(),)),
            *counted,
        )
        self._bar = Bar(*columns, console=Console(stderr=True), transient=transient)
        self._bar.start()
        self._task = self._bar.add_task(f"{self.action} {self.label}", total=self.total)

    def _amount(self, n: int) -> str:
        return f"{n} {self.unit}"

    def advance(self, n: int) -> None:
        """Count ``n`` more units."""
        self.update(self.done + n)

    def update(self, done: int, total: int | None = None) -> None:
        """Set the count to ``done`` (and the total, when it has become known)."""
        with self._lock:
            self.done = done
            if total is not None:
                self.total = total
            if self._bar is not None:
                self._bar.update(self._task, completed=done, total=self.total)
                return
            if not (self._steps and self.total):
                return
            tenth = 10 * self.done // self.total
            if tenth >= self._next_tenth:
                self._log.info(
                    "%s %s: %d%% (%d/%s)",
                    self.action,
                    self.label,
                    100 * self.done // self.total,
                    self.done,
                    self._amount(self.total),
                )
                self._next_tenth = tenth + 1

    def close(self, *, failed: bool = False) -> None:
        """Stop the bar, or log the end of the work with the time it took."""
        if self._closed:
            return
        self._closed = True
        took = time.monotonic() - self._started
        if self._bar is not None:
            self._bar.stop()
        elif failed:
            self._log.info("%s %s failed after %.1fs", self.action, self.label, took)
        elif self.unit is None:
            self._log.info("%s %s in %.1fs", self.finished, self.label, took)
        else:
            self._log.info("%s %s: %s in %.1fs", self.finished, self.label, self._amount(self.done), took)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close(failed=kind is not None)
