"""Training progress for people: a rich bar on a terminal (step, loss, tokens/s, time left), lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

from microserve.finetune.train import StepRecord


class ConsoleProgress:
    """A :class:`~microserve.finetune.train.ProgressSink` on stderr."""

    def __init__(self, label: str, *, tty: bool | None = None, every: int = 10) -> None:
        from rich.console import Console

        self.label = label
        self.console = Console(stderr=True)
        self._tty = sys.stderr.isatty() if tty is None else tty
        self._every = every
        self._bar: Any = None
        self._task: Any = None
        self._total = 0
        self._started = 0.0
        self._first = 0

    def start(self, total_steps: int, done: int) -> None:
        """Show the bar (resumed runs start part-way)."""
        self._total = total_steps
        self._started = time.monotonic()
        self._first = done
        if done:
            self.console.print(f"resuming at step {done} of {total_steps}")
        if not self._tty:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tok/s"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=total_steps, completed=done, loss="-", speed="-")

    def step(self, record: StepRecord, tokens_per_second: float) -> None:
        """Advance by one step."""
        if self._bar is not None:
            self._bar.update(
                self._task, completed=record.step, loss=f"{record.loss:.4f}", speed=f"{tokens_per_second:,.0f}"
            )
            return
        if record.step % self._every == 0 or record.step == self._total:
            done = record.step - self._first
            elapsed = time.monotonic() - self._started
            left = elapsed / max(done, 1) * (self._total - record.step)
            self.console.print(
                f"step {record.step}/{self._total} loss {record.loss:.4f} {tokens_per_second:,.0f} tok/s "
                f"{left:.0f}s left",
                highlight=False,
            )

    def message(self, text: str) -> None:
        """A line above the bar."""
        self.console.print(text, highlight=False)

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
