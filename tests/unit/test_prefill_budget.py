"""The per-step prompt budget learnt from step times."""

from __future__ import annotations

from pathlib import Path

from microserve.engines.llamacpp import build
from microserve.engines.llamacpp.scheduler import PrefillBudget
from microserve.engines.registry import EngineTarget
from microserve.settings import Settings


def test_first_guess_before_any_measurement() -> None:
    assert PrefillBudget(256).chunk() == 32
    assert PrefillBudget(16).chunk() == 16


def test_budget_keeps_a_mixed_step_within_twice_a_decode_step() -> None:
    budget = PrefillBudget(512)
    for _ in range(20):
        budget.observe(decode_tokens=4, prompt_tokens=0, seconds=0.010)
        budget.observe(decode_tokens=4, prompt_tokens=40, seconds=0.030)  # 0.5 ms a prompt token
    assert 18 <= budget.chunk() <= 22  # 10 ms of headroom / 0.5 ms a token


def test_a_larger_step_factor_admits_more_prompt_tokens_a_step() -> None:
    budgets = {factor: PrefillBudget(512, factor=factor) for factor in (2.0, 6.0)}
    for budget in budgets.values():
        for _ in range(20):
            budget.observe(decode_tokens=4, prompt_tokens=0, seconds=0.010)
            budget.observe(decode_tokens=4, prompt_tokens=40, seconds=0.030)
    assert 18 <= budgets[2.0].chunk() <= 22
    assert 90 <= budgets[6.0].chunk() <= 110  # 50 ms of headroom / 0.5 ms a token


def test_the_step_factor_setting_reaches_the_engine(tmp_path: Path) -> None:
    target = EngineTarget(engine="llamacpp", name="m", path=tmp_path / "m.gguf", task="text")
    assert build(target, Settings()).config.prefill_step_factor == 2.0
    assert build(target, Settings(prefill_step_factor=6.0)).config.prefill_step_factor == 6.0


def test_fast_prompt_tokens_fill_the_batch_and_slow_ones_keep_a_floor() -> None:
    fast = PrefillBudget(256)
    fast.observe(decode_tokens=8, prompt_tokens=0, seconds=0.010)
    fast.observe(decode_tokens=8, prompt_tokens=200, seconds=0.011)
    assert fast.chunk() == 256
    slow = PrefillBudget(256)
    slow.observe(decode_tokens=8, prompt_tokens=0, seconds=0.010)
    slow.observe(decode_tokens=8, prompt_tokens=10, seconds=1.0)
    assert slow.chunk() == PrefillBudget.FLOOR


def test_prompt_only_steps_give_a_first_estimate() -> None:
    budget = PrefillBudget(256)
    budget.observe(decode_tokens=0, prompt_tokens=100, seconds=0.1)  # 1 ms a token
    budget.observe(decode_tokens=2, prompt_tokens=0, seconds=0.02)
    assert budget.chunk() == 20


def test_a_burst_of_waiting_prompts_is_prefilled_at_full_width() -> None:
    budget = PrefillBudget(256)
    for _ in range(20):
        budget.observe(decode_tokens=4, prompt_tokens=0, seconds=0.010)
        budget.observe(decode_tokens=4, prompt_tokens=40, seconds=0.030)  # 0.5 ms a prompt token
    steady = budget.chunk(waiting=1, decoding=15)
    assert 18 <= steady <= 22 and budget.chunk(waiting=1, decoding=1) == steady
    # A burst: two or more prompts wait; their first tokens matter more than the streams' pace.
    assert budget.chunk(waiting=2, decoding=15) == 256
    assert budget.chunk(waiting=4, decoding=4) == 256
    assert budget.chunk(waiting=12, decoding=2) == 256
    assert budget.chunk(waiting=15, decoding=1) == 256
    assert PrefillBudget(256).chunk(waiting=8, decoding=1) == 256  # before any measurement too
