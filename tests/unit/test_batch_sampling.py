"""The numpy row sampler against the distribution it must draw from.

Each distribution test draws 10^5 tokens from one fixed logit vector and compares the counts with the target
distribution by a chi-square test at significance 1e-4 (tokens expected fewer than 5 times pooled into one bin;
tokens outside the kept set must never appear). The target comes from llama.cpp's own sampler chain, applied to the
same logits, and is checked against a reference written here from the definitions. Greedy picks must equal
llama.cpp's greedy chain exactly, and a seeded sequence must repeat itself whatever else is sampled.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterable
from dataclasses import replace

import llama_cpp as L
import numpy as np
import pytest

from microserve.engines.base import SamplingParams
from microserve.engines.llamacpp import batch_sampling
from microserve.engines.llamacpp.batch_sampling import PenaltyWindow, RowSampler
from microserve.engines.llamacpp.sampling import _CANDIDATE, _add_shaping

VOCAB = 3_000
DRAWS = 100_000
EOG = (2, 7)
HISTORY = (11, 11, 11, 42, 42, 5, 900, 11)  # generated tokens the penalties count


def logits(seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    """A language-model-like row: a few strong candidates (some of them in the history), a body of plausible tokens
    that holds a few percent of the mass at temperature 1, and most of the vocabulary far below."""
    rng = np.random.default_rng(seed)
    row = rng.normal(-14.0, 2.0, vocab).astype(np.float32)
    row[: vocab // 10] = rng.normal(0.0, 1.5, vocab // 10)
    strong = [11, 42, 5, 900, 3, 8, 13, 21, 34, 55]
    row[strong] += np.array([12.0, 10.5, 10.0, 9.5, 11.3, 9.0, 8.5, 8.0, 7.0, 6.5], dtype=np.float32)
    row[EOG[0]] += 11.5
    return row


def llama_chain_probs(row: np.ndarray, params: SamplingParams, history: Iterable[int] = ()) -> np.ndarray:
    """The distribution llama.cpp's chain (bias, penalties, top-k/p, min-p, temperature) leaves for its draw."""
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    try:
        _add_shaping(chain, params, n_vocab=len(row), eog_ids=EOG, penalty_window=64, grammar=None)
        for token in history:
            L.llama_sampler_accept(chain, token)
        cand = np.empty(len(row), dtype=_CANDIDATE)
        cand["id"] = np.arange(len(row), dtype=np.int32)
        cand["logit"] = row
        cand["p"] = 0.0
        array = L.llama_token_data_array(
            data=cand.ctypes.data_as(L.llama_token_data_p), size=len(row), selected=-1, sorted=False
        )
        L.llama_sampler_apply(chain, ctypes.byref(array))
        kept = cand[: array.size]
    finally:
        L.llama_sampler_free(chain)
    probs = np.zeros(len(row))
    values = kept["logit"].astype(np.float64)
    finite = np.isfinite(values)
    weights = np.exp(values[finite] - values[finite].max())
    probs[kept["id"][finite]] = weights / weights.sum()
    return probs


def reference_probs(row: np.ndarray, params: SamplingParams, history: Iterable[int] = ()) -> np.ndarray:
    """The same distribution from the definitions, in float64."""
    x = row.astype(np.float64)
    for token, bias in params.logit_bias.items():
        x[token] += bias
    if params.ignore_eos:
        x[list(EOG)] = -np.inf
    counts: dict[int, int] = {}
    for token in history:
        counts[token] = counts.get(token, 0) + 1
    for token, n in counts.items():
        x[token] = x[token] * params.repetition_penalty if x[token] <= 0 else x[token] / params.repetition_penalty
        x[token] -= n * params.frequency_penalty + params.presence_penalty
    order = np.argsort(-x, kind="stable")
    keep = len(order)
    if params.top_k > 0:
        keep = min(keep, params.top_k)
    if params.top_p < 1.0:
        p = np.exp(x[order[:keep]] - x[order[0]])
        cumulative = np.cumsum(p / p.sum())
        keep = min(keep, int(np.searchsorted(cumulative, params.top_p)) + 1)
    if params.min_p > 0.0:
        keep = min(keep, int(np.sum(x[order[:keep]] >= x[order[0]] + math.log(params.min_p))))
    kept = order[:keep]
    probs = np.zeros(len(x))
    weights = np.exp((x[kept] - x[order[0]]) / params.temperature)
    probs[kept] = weights / weights.sum()
    return probs


def draw_counts(row: np.ndarray, params: SamplingParams, history: Iterable[int] = (), seed: int = 1) -> np.ndarray:
    """Counts of DRAWS tokens, each drawn by a fresh step on a fresh copy of the row (as each decode writes one)."""
    sampler = RowSampler(replace(params, seed=seed), n_vocab=len(row), eog_ids=EOG, penalty_window=64)
    for token in history:
        sampler.accept(token)
    shaped = row.copy()
    sampler.shape(shaped)
    scratch = np.empty(len(row), dtype=np.float32)
    counts = np.zeros(len(row), dtype=np.int64)
    for _ in range(DRAWS):
        work = shaped.copy()
        token = sampler.pick(work, scratch)
        assert token is not None
        counts[token] += 1
    return counts


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """The statistic and its critical value at significance 1e-4 (Wilson-Hilferty); zero-probability tokens
    drawn at all make the statistic infinite."""
    if counts[probs == 0.0].any():
        return math.inf, 0.0
    expected = probs * counts.sum()
    big = expected >= 5.0
    observed_bins = [*counts[big], counts[~big & (probs > 0)].sum()]
    expected_bins = [*expected[big], expected[~big & (probs > 0)].sum()]
    if expected_bins[-1] < 5.0:  # too little left to pool: fold it into the smallest bin
        observed_bins[-2] += observed_bins.pop()
        expected_bins[-2] += expected_bins.pop()
    o, e = np.array(observed_bins, dtype=np.float64), np.array(expected_bins)
    statistic = float(((o - e) ** 2 / e).sum())
    df = len(o) - 1
    z = 3.719  # the standard normal's 1 - 1e-4 quantile
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return statistic, critical


CASES = {
    "temperature 0.8": SamplingParams(max_tokens=1, temperature=0.8),
    "temperature 1.3": SamplingParams(max_tokens=1, temperature=1.3),
    "top_p 0.95": SamplingParams(max_tokens=1, temperature=0.8, top_p=0.95),
    "min_p 0.05": SamplingParams(max_tokens=1, temperature=0.7, min_p=0.05),
    "llama-server's chain": SamplingParams(max_tokens=1, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    "top_k 3, top_p 0.99": SamplingParams(max_tokens=1, temperature=1.5, top_k=3, top_p=0.99),
    "penalties and bias": SamplingParams(
        max_tokens=1,
        temperature=0.9,
        top_p=0.98,
        presence_penalty=0.6,
        frequency_penalty=0.4,
        repetition_penalty=1.3,
        logit_bias={13: 3.0, 3: -100.0, 21: 2.5},
        ignore_eos=True,
    ),
}


# A narrow head puts most of the mass outside it: the paths that widen it (top-k, top-p) and that bound the tail
# and compute it when the bound does not decide (temperature alone) then run on most draws instead of almost never.
NARROW = ["temperature 1.3", "top_p 0.95", "llama-server's chain", "penalties and bias"]


@pytest.mark.parametrize(
    ("name", "head", "draw"),
    [(name, batch_sampling._HEAD_WIDTH, batch_sampling._DRAW_WIDTH) for name in CASES]
    + [(name, 0.5, 1.0) for name in NARROW],
)
def test_draws_follow_llama_cpps_distribution(
    name: str, head: float, draw: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_sampling, "_HEAD_WIDTH", head)
    monkeypatch.setattr(batch_sampling, "_DRAW_WIDTH", draw)
    monkeypatch.setattr(batch_sampling, "_BLOCK", 1024)  # the tail's draw then has whole blocks and a partial one
    params = CASES[name]
    history = HISTORY if name == "penalties and bias" else ()
    row = logits()
    target = llama_chain_probs(row, params, history)
    # The target is the distribution the definitions give (the chain's float32 differs in the 6th digit).
    np.testing.assert_allclose(target, reference_probs(row, params, history), rtol=1e-4, atol=1e-9)
    counts = draw_counts(row, params, history)
    statistic, critical = chi_square(counts, target)
    assert statistic < critical, (name, statistic, critical)
    # The same counts are far from the distribution one stage off (here: no temperature), so the test can fail.
    untempered = llama_chain_probs(row, replace(params, temperature=1.0), history)
    wrong = untempered if params.temperature != 1.0 else llama_chain_probs(row, SamplingParams(max_tokens=1), history)
    assert chi_square(counts, wrong)[0] > 2 * critical
    if name == "penalties and bias":
        assert counts[list(EOG)].sum() == 0  # ignore_eos bans them, although EOG[0] is among the likeliest
        assert counts[3] == 0  # biased by -100


def test_llama_servers_chain_keeps_at_most_top_k() -> None:
    assert 1 < np.count_nonzero(llama_chain_probs(logits(), CASES["llama-server's chain"])) <= 40


@pytest.mark.parametrize("seed", range(20))
def test_greedy_picks_equal_llama_cpps_greedy_chain(seed: int) -> None:
    rng = np.random.default_rng(seed)
    row = logits(seed)
    history = [int(t) for t in rng.choice([11, 42, 5, 900, 3, 8], size=int(rng.integers(0, 12)))]
    params = SamplingParams(
        max_tokens=1,
        temperature=0.0,
        presence_penalty=float(rng.uniform(0, 2)),
        frequency_penalty=float(rng.uniform(0, 1)),
        repetition_penalty=float(rng.uniform(1, 1.8)),
        logit_bias={int(rng.integers(0, VOCAB)): float(rng.uniform(-5, 12)), 8: float(rng.uniform(0, 4))},
        ignore_eos=bool(seed % 2),
    )
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    _add_shaping(chain, params, n_vocab=VOCAB, eog_ids=EOG, penalty_window=64, grammar=None)
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
    sampler = RowSampler(params, n_vocab=VOCAB, eog_ids=EOG, penalty_window=64)
    for token in history:
        L.llama_sampler_accept(chain, token)
        sampler.accept(token)
    cand = np.empty(VOCAB, dtype=_CANDIDATE)
    cand["id"] = np.arange(VOCAB, dtype=np.int32)
    cand["logit"] = row
    array = L.llama_token_data_array(
        data=cand.ctypes.data_as(L.llama_token_data_p), size=VOCAB, selected=-1, sorted=False
    )
    L.llama_sampler_apply(chain, ctypes.byref(array))
    expected = int(cand["id"][array.selected])
    L.llama_sampler_free(chain)
    work = row.copy()
    sampler.shape(work)
    assert sampler.pick(work, np.empty(VOCAB, dtype=np.float32)) == expected


def test_a_row_with_nothing_allowed_gives_no_token() -> None:
    params = SamplingParams(max_tokens=1, temperature=0.8, logit_bias={i: -math.inf for i in range(8)})
    for temperature in (0.0, 0.8):
        sampler = RowSampler(replace(params, temperature=temperature), n_vocab=8, eog_ids=(), penalty_window=8)
        row = np.zeros(8, dtype=np.float32)
        sampler.shape(row)
        assert sampler.pick(row, np.empty(8, dtype=np.float32)) is None


def run(sampler: RowSampler, rows: list[np.ndarray]) -> list[int | None]:
    scratch = np.empty(VOCAB, dtype=np.float32)
    out = []
    for row in rows:
        work = row.copy()
        sampler.shape(work)
        token = sampler.pick(work, scratch)
        assert token is not None
        sampler.accept(token)
        out.append(token)
    return out


def test_a_seeded_sequence_repeats_itself_whatever_else_is_sampled() -> None:
    rows = [logits(seed) for seed in range(40)]
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9, seed=1234, presence_penalty=0.5)

    def make(choice: int = 0, seed: int | None = 1234) -> RowSampler:
        return RowSampler(replace(params, seed=seed), n_vocab=VOCAB, eog_ids=EOG, penalty_window=64, choice=choice)

    alone = run(make(), rows)
    # Interleaved with other sequences' draws, as in a batch: each sequence's generator is its own.
    a, b = make(), make(seed=None)
    scratch = np.empty(VOCAB, dtype=np.float32)
    mixed = []
    for row in rows:
        for sampler in (b, a, b):
            work = row.copy()
            sampler.shape(work)
            token = sampler.pick(work, scratch)
            assert token is not None
            sampler.accept(token)
            if sampler is a:
                mixed.append(token)
    assert mixed == alone
    # Another choice of the same seeded request, and an unseeded sequence, take their own ways.
    assert run(make(choice=1), rows) != alone
    assert run(make(seed=None), rows) != alone


def test_the_penalty_window_forgets_the_oldest_token() -> None:
    window = PenaltyWindow(3, repeat=1.0, frequency=1.0, presence=0.0)
    for token in (4, 4, 5, 6):  # the first 4 has left the window
        window.accept(token)
    row = np.zeros(8, dtype=np.float32)
    window.apply(row)
    assert row.tolist() == [0, 0, 0, 0, -1, -1, -1, 0]
