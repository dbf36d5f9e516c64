"""How many threads llama.cpp decodes with on a machine it shares, and how its idle threads wait.

llama.cpp runs a decode as a graph whose every node ends at a barrier across its threads (OpenMP in the pinned
llama-cpp-python build: ``#pragma omp barrier``). While another process holds one of the cores, the thread on that
core gets it only in scheduler slices of a few milliseconds, and the threads on the free cores wait for it at each
of the hundreds of barriers of a step, spinning (libgomp spins about 300,000 times, roughly a millisecond, before it
sleeps) on cores the server's own event loop needs. A step that took milliseconds takes a slice per barrier: on a
2-core machine at load 5-9, decoding with 2 threads ran 10-15x slower than with one.

Two measures, chosen by measurement (docs/benchmarks.md, ``bench/contention.py``):

* :class:`ThreadPolicy` estimates, every second, the CPU other processes want on this process's CPUs: the time they
  took (``/proc/stat`` less this process's own time) plus the time this process's threads spent runnable but
  waiting for a CPU (``schedstat``), which is what they took from it. It sets llama.cpp's thread count to the CPUs
  left, between 1 and the usable cores (affinity and cgroup quota, :func:`microserve.hardware.usable_cores`). A
  quiet machine keeps every core; a neighbour on one of two cores leaves one thread, with nobody to wait for.
* :func:`prepare_openmp` shortens libgomp's spin before a waiting thread sleeps (``GOMP_SPINCOUNT``), unless the
  operator set it or ``OMP_WAIT_POLICY``; it must run before llama.cpp's libraries load.

An explicit thread count (``--threads``, or a profile's) is kept as it is, and so is libgomp's own spin: an operator
who pins the thread count has given the server its cores, and on cores of its own the long spin decodes faster (at
c = 4 and 8 on 2 cores, 12-15% more tokens per second than the short one, docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# libgomp's spin before sleeping, in iterations (~0.1 ms here; its default is 300,000). Chosen by measurement.
SPIN_COUNT = "10000"
INTERVAL = 1.0


def prepare_openmp() -> None:
    """Set libgomp's spin count for llama.cpp's threads, unless the environment already chose a wait policy.
    libgomp reads it once, when it loads: call this before ``llama_cpp`` is first imported."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def parse_proc_stat(text: str, cpus: frozenset[int]) -> tuple[int, int]:
    """Busy and total clock ticks of ``cpus`` from ``/proc/stat`` text (iowait counts as idle, steal as busy)."""
    busy = total = 0
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        if not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        ticks = [int(f) for f in fields[:8]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        busy += sum(ticks) - idle
        total += sum(ticks)
    return busy, total


def parse_own_ticks(text: str) -> int:
    """User plus system clock ticks of a process from its ``/proc/<pid>/stat`` text."""
    fields = text.rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of the whole line


def waiting_ns(task_dir: Path) -> int:
    """Nanoseconds this process's threads have spent runnable but waiting for a CPU (``schedstat``'s run
    delay, summed over ``/proc/self/task``); 0 where the kernel keeps no such statistics."""
    total = 0
    for task in task_dir.iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended, or no schedstat
    return total


class CpuSampler:
    """The CPUs other processes leave free for this one, among those it may use, since the previous sample."""

    def __init__(self, cpus: frozenset[int], proc: Path = Path("/proc")) -> None:
        self.cpus = cpus
        self._proc = proc
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last: tuple[int, int, int, int] | None = None

    def _read(self) -> tuple[int, int, int, int]:
        busy, total = parse_proc_stat((self._proc / "stat").read_text(), self.cpus)
        own = parse_own_ticks((self._proc / "self" / "stat").read_text())
        return busy, total, own, waiting_ns(self._proc / "self" / "task")

    def sample(self) -> float | None:
        """Free CPUs over the last interval; None on the first call or when ``/proc`` cannot be read."""
        try:
            now = self._read()
        except (OSError, ValueError, IndexError):
            return None
        last, self._last = self._last, now
        if last is None or now[1] <= last[1]:
            return None
        per_cpu = (now[1] - last[1]) / len(self.cpus)  # clock ticks that passed
        took = max(0, (now[0] - last[0]) - (now[2] - last[2])) / per_cpu
        waited = max(0, now[3] - last[3]) / 1e9 * self._hz / per_cpu
        return max(0.0, len(self.cpus) - took - waited)


class ThreadPolicy:
    """Keeps llama.cpp's thread count at the CPUs other processes leave free, from 1 to ``ceiling``."""

    def __init__(
        self,
        ceiling: int,
        apply: Callable[[int], None],
        sampler: CpuSampler | None = None,
        interval: float = INTERVAL,
    ) -> None:
        self.ceiling = max(1, ceiling)
        self.threads = self.ceiling
        self._apply = apply
        self._sampler = sampler or CpuSampler(frozenset(os.sched_getaffinity(0)))
        self._interval = interval
        self._proposal: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="microserve-threads", daemon=True)

    def decide(self, free: float) -> int | None:
        """The thread count to switch to after a sample of ``free`` CPUs, or None to stay: a change needs two
        samples in a row to agree, so a passing spike does not flip it."""
        wanted = min(self.ceiling, max(1, int(free + 0.5)))
        if wanted == self.threads:
            self._proposal = None
            return None
        if self._proposal != wanted:
            self._proposal = wanted
            return None
        self._proposal = None
        return wanted

    def start(self) -> None:
        """Start sampling (a thread of its own)."""
        if self.ceiling > 1:
            self._sampler.sample()
            self._thread.start()

    def stop(self) -> None:
        """Stop sampling; the thread count stays where it is."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            free = self._sampler.sample()
            if free is None:
                continue
            wanted = self.decide(free)
            if wanted is None:
                continue
            log.info(
                "llama.cpp threads %d -> %d: other processes keep %.1f of %d CPUs busy",
                self.threads,
                wanted,
                len(self._sampler.cpus) - free,
                len(self._sampler.cpus),
            )
            self.threads = wanted
            started = time.perf_counter()
            self._apply(wanted)
            log.debug("thread count applied in %.3f ms", (time.perf_counter() - started) * 1000)
