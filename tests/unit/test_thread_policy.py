"""llama.cpp's thread count follows the CPUs other processes leave free (fake /proc), and libgomp's spin is set only
where the operator chose no wait policy."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from microserve.engines.llamacpp import threads
from microserve.engines.llamacpp.threads import CpuSampler, ThreadPolicy, parse_own_ticks, parse_proc_stat

STAT = """cpu  500 0 300 900 0 0 0 0 0 0
cpu0 100 0 100 300 0 0 0 0 0 0
cpu1 400 0 200 600 0 0 0 0 0 0
intr 1 2 3
"""


def test_proc_stat_counts_busy_and_total_ticks_of_our_cpus() -> None:
    assert parse_proc_stat(STAT, frozenset({0, 1})) == (800, 1700)
    assert parse_proc_stat(STAT, frozenset({1})) == (600, 1200)


def test_own_ticks_are_user_plus_system_even_with_spaces_in_the_name() -> None:
    line = "4242 (python -m x) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0 9 0 100 0 0"
    assert parse_own_ticks(line) == 200


class FakeProc:
    """A /proc whose counters advance as a test says."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "self" / "task" / "1").mkdir(parents=True)
        self.cpu = [[0, 0], [0, 0]]  # busy, idle ticks per CPU
        self.own = 0
        self.wait_ns = 0
        self.write()

    def write(self) -> None:
        lines = [f"cpu{i} {busy} 0 0 {idle} 0 0 0 0 0 0" for i, (busy, idle) in enumerate(self.cpu)]
        (self.root / "stat").write_text("cpu  0 0 0 0\n" + "\n".join(lines) + "\n")
        (self.root / "self" / "stat").write_text(f"1 (x) S {' '.join(['0'] * 10)} {self.own} 0 0\n")
        (self.root / "self" / "task" / "1" / "schedstat").write_text(f"0 {self.wait_ns} 0\n")

    def second(self, busy: tuple[int, int], own: int, waited: float = 0.0, hz: int = 100) -> None:
        """One second passes: each CPU was busy ``busy[i]`` of ``hz`` ticks, ``own`` of them ours."""
        for i, ticks in enumerate(busy):
            self.cpu[i][0] += ticks
            self.cpu[i][1] += hz - ticks
        self.own += own
        self.wait_ns += int(waited * 1e9)
        self.write()


def test_a_busy_neighbour_and_the_time_it_took_from_us_are_counted(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    sampler = CpuSampler(frozenset({0, 1}), proc=tmp_path)
    sampler._hz = 100
    assert sampler.sample() is None
    proc.second((30, 0), own=30)  # quiet: only our own work
    assert sampler.sample() == pytest.approx(2.0)
    # A neighbour on CPU 0 gets half of it; our thread there waited for the other half.
    proc.second((100, 100), own=150, waited=0.5)
    assert sampler.sample() == pytest.approx(1.0)


def test_the_policy_moves_after_two_samples_agree_and_stays_within_its_bounds() -> None:
    applied: list[int] = []
    policy = ThreadPolicy(2, applied.append)
    assert policy.decide(1.0) is None  # the first low sample is only a proposal
    assert policy.decide(1.1) == 1
    policy.threads = 1
    assert policy.decide(0.0) is None  # never below one thread
    assert policy.decide(1.9) is None
    assert policy.decide(2.0) == 2
    policy.threads = 2
    assert policy.decide(7.5) is None  # never above the usable cores


def test_the_policy_thread_applies_the_new_count(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    applied: list[int] = []
    sampler = CpuSampler(frozenset({0, 1}), proc=tmp_path)
    sampler._hz = 100

    class Stepping(CpuSampler):
        def sample(self) -> float | None:
            proc.second((100, 20), own=20)  # a neighbour holds CPU 0 outright
            return sampler.sample()

    policy = ThreadPolicy(2, applied.append, Stepping(frozenset({0, 1}), proc=tmp_path), interval=0.01)
    policy.start()
    try:
        for _ in range(500):
            if applied:
                break
            time.sleep(0.01)
    finally:
        policy.stop()
    assert applied == [1] and policy.threads == 1


def test_prepare_openmp_respects_the_operators_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    threads.prepare_openmp()
    assert os.environ["GOMP_SPINCOUNT"] == threads.SPIN_COUNT
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.prepare_openmp()
    assert "GOMP_SPINCOUNT" not in os.environ


@pytest.mark.parametrize(("explicit", "spin"), [(None, threads.SPIN_COUNT), (2, None)])
def test_only_an_adaptive_engine_shortens_the_spin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, explicit: int | None, spin: str | None
) -> None:
    """A pinned thread count keeps libgomp's own spin (the server has its cores); the adaptive default shortens it."""
    from microserve.engines import llamacpp
    from microserve.engines.registry import EngineTarget
    from microserve.settings import Settings

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    target = EngineTarget(engine="llamacpp", name="m", path=tmp_path / "m.gguf", task="chat")
    engine = llamacpp.build(target, Settings(threads=explicit))
    assert os.environ.get("GOMP_SPINCOUNT") == spin
    assert engine.config.adaptive_threads is (explicit is None)  # type: ignore[attr-defined]
