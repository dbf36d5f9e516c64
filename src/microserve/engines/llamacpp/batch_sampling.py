"""Exact sampling of every plain sequence of a step with numpy, on the logits array llama.cpp already holds.

A *plain* sequence has no grammar and asks for no logprobs: its next token depends only on its logits, its
sampling parameters, the tokens it generated (penalties) and its random generator. Those are sampled here, all rows
of a step from the one ``[n_outputs x n_vocab]`` array ``llama_get_logits`` returns, without copying the vocabulary
into a candidate array per sequence as llama.cpp's sampler chain does. On a 262k-token vocabulary that copy, a full
softmax and the sort behind top-p cost milliseconds per sequence and token on the engine thread.

What each stage does, in llama.cpp's chain order (the order llama-server uses), so that the distribution is the same:

1. logit bias (``ignore_eos`` bans the end-of-generation tokens) and the presence/frequency/repetition penalties
   over the last ``penalty_window`` generated tokens: written into the row in place, on those few ids only (the row
   is this sequence's own and llama.cpp overwrites it at the next decode);
2. greedy (temperature 0): the first highest logit, as llama.cpp's greedy sampler picks;
3. top-k, then top-p on the temperature-1 softmax of what is left, then min-p relative to the highest logit;
4. the draw from ``softmax(logits / temperature)`` over the kept tokens, by inverse CDF with one uniform from the
   sequence's own generator.

Nothing is approximated: top-k and top-p start from the tokens above a threshold and widen it until the kept set is
provably inside, and sort only the few tokens where the cut falls (top-p needs the full softmax normaliser, one
pass of ``exp``); sampling the whole vocabulary (temperature alone) weighs the head first, computes the tail's mass
only when its bound does not decide, and then sums block by block and searches only the block the uniform lands
in. Probabilities are computed in float32 and accumulated in float64 (top-p's normaliser by float32's pairwise sum,
within 1e-6), as precise as llama.cpp's own sampler.

Each sequence owns a generator seeded from the request's seed and its choice index, and draws exactly one uniform
per sampled token, so a seeded request gives the same tokens whatever else runs in the batch.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Iterable

import numpy as np

from microserve.engines.base import SamplingParams

_BLOCK = 4096  # a draw from the tail sums blocks of this many probabilities, then searches one block
_DRAW_WIDTH = 16.0  # a draw from the whole vocabulary weighs the tokens within this many tempered nats of the
#                     highest first; each beyond weighs less than e^-16 of the highest, their total is bounded
_HEAD_WIDTH = 12.0  # top-k and top-p first look among the tokens this close to the highest logit, then twice as far
#                     (Gemma's and SmolLM2's top-p 0.95 cut lies 4-10 nats down)
_BAND = 0.5  # top-p weighs the gathered tokens in bands of this many nats; only the band of the cut is sorted
_MAX_BANDS = 64  # the last band holds everything further down
_ALL = 1e3  # a width past which every finite logit is in
_RAW_EXP_LOW, _RAW_EXP_HIGH = -20.0, 40.0  # highest logits for which top-p's weights need no shift
_MASK64 = (1 << 64) - 1


class PenaltyWindow:
    """How often each of the last ``size`` generated tokens occurred, and llama.cpp's penalties from it.

    For each token in the window (count ``n``): a logit ``<= 0`` is multiplied by ``repeat``, a positive one
    divided by it, then ``n * frequency + presence`` is subtracted, in float32 as llama.cpp does.
    """

    __slots__ = ("_counts", "_frequency", "_presence", "_recent", "_repeat", "size")

    def __init__(self, size: int, repeat: float, frequency: float, presence: float) -> None:
        self.size = size
        self._repeat = np.float32(repeat)
        self._frequency = np.float32(frequency)
        self._presence = np.float32(presence)
        self._recent: deque[int] = deque()
        self._counts: dict[int, int] = {}

    def accept(self, token: int) -> None:
        """Count a generated token, forgetting the oldest once the window is full."""
        if self.size <= 0:
            return
        counts = self._counts
        counts[token] = counts.get(token, 0) + 1
        if len(self._recent) >= self.size:
            old = self._recent.popleft()
            left = counts[old] - 1
            if left:
                counts[old] = left
            else:
                del counts[old]
        self._recent.append(token)

    def apply(self, row: np.ndarray) -> None:
        """Penalise the counted tokens of ``row`` (float32 logits) in place."""
        if not self._counts:
            return
        n = len(self._counts)
        ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=n)
        counts = np.fromiter(self._counts.values(), dtype=np.float32, count=n)
        values = row[ids]
        values = np.where(values <= 0, values * self._repeat, values / self._repeat)
        values -= counts * self._frequency + self._presence
        row[ids] = values


def request_biases(params: SamplingParams, eog_ids: Iterable[int]) -> dict[int, float]:
    """The request's logit bias, with end-of-generation tokens banned outright under ``ignore_eos``, as
    llama-server does, so the sequence runs to max_tokens. With a grammar this ends the sequence once the grammar
    is complete (nothing else is allowed then)."""
    biases = {int(t): float(b) for t, b in params.logit_bias.items()}
    if params.ignore_eos:
        biases.update({token: float("-inf") for token in eog_ids})
    return biases


def has_penalties(params: SamplingParams) -> bool:
    """Whether any of the presence, frequency or repetition penalties is active."""
    return params.repetition_penalty != 1.0 or bool(params.frequency_penalty) or bool(params.presence_penalty)


def sequence_rng(seed: int | None, choice: int) -> np.random.Generator:
    """The generator of one choice: from the request's seed and the choice's index, or fresh entropy."""
    entropy = secrets.randbits(64) if seed is None else seed & _MASK64
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([entropy, choice])))


class RowSampler:
    """The sampling state of one plain sequence: its shaping, truncation, temperature, penalties and generator."""

    __slots__ = ("_bias_ids", "_bias_values", "_log_min_p", "_penalties", "_rng", "min_p", "temperature", "top_k",
                 "top_p")  # fmt: skip

    def __init__(
        self,
        params: SamplingParams,
        *,
        n_vocab: int,
        eog_ids: Iterable[int],
        penalty_window: int,
        choice: int = 0,
    ) -> None:
        biases = request_biases(params, eog_ids)
        self._bias_ids = np.fromiter(biases.keys(), dtype=np.int64, count=len(biases))
        self._bias_values = np.fromiter(biases.values(), dtype=np.float32, count=len(biases))
        self._penalties = (
            PenaltyWindow(penalty_window, params.repetition_penalty, params.frequency_penalty, params.presence_penalty)
            if has_penalties(params)
            else None
        )
        self.temperature = params.temperature
        self.top_k = params.top_k if 0 < params.top_k < n_vocab else 0
        self.top_p = params.top_p
        self.min_p = params.min_p
        self._log_min_p = np.float32(math.log(params.min_p)) if params.min_p > 0.0 else None
        self._rng = sequence_rng(params.seed, choice)

    @property
    def greedy(self) -> bool:
        """True for temperature 0: the first highest logit, no draw."""
        return self.temperature <= 0.0

    def shape(self, row: np.ndarray) -> None:
        """Apply the logit bias, then the penalties, to ``row`` in place (a few ids, not the vocabulary)."""
        if len(self._bias_ids):
            row[self._bias_ids] += self._bias_values
        if self._penalties is not None:
            self._penalties.apply(row)

    def accept(self, token: int) -> None:
        """Record the sampled token (for the penalties)."""
        if self._penalties is not None:
            self._penalties.accept(token)

    def pick(self, row: np.ndarray, scratch: np.ndarray) -> int | None:
        """The next token from the shaped ``row``; None when every logit is -inf (nothing is allowed)."""
        if self.greedy:
            token = int(np.argmax(row))
            return token if math.isfinite(row[token]) else None
        return self.draw(row, float(row.max()), scratch)

    def draw(self, row: np.ndarray, top: float, scratch: np.ndarray) -> int | None:
        """A sampled token from the shaped ``row`` whose highest logit is ``top``; None when that is -inf.

        One uniform per token, always. ``scratch`` is a float32 buffer of the row's length the draw may overwrite.
        """
        if not math.isfinite(top):
            return None
        u = float(self._rng.random())
        temperature = self.temperature
        kept: tuple[np.ndarray, np.ndarray] | None = None  # (ids, logits less the highest): the kept set
        if self.top_k:
            kept = _top_k(row, top, self.top_k)
        if self.top_p < 1.0:
            kept = _nucleus_of(*kept, self.top_p) if kept is not None else _nucleus(row, top, self.top_p, scratch)
        if self._log_min_p is not None:
            # llama.cpp's comparison, in float32: logit >= highest + log(min_p).
            floor = np.float32(top) + self._log_min_p
            if kept is None:
                ids = np.flatnonzero(row >= floor)
                kept = ids, row[ids] - np.float32(top)
            else:
                keep = row[kept[0]] >= floor
                kept = kept[0][keep], kept[1][keep]
        if kept is None:
            return _draw_all(row, top, temperature, u, scratch)
        ids, values = kept
        return int(ids[_inverse_cdf(np.exp(values / np.float32(temperature)), u)])


def _inverse_cdf(weights: np.ndarray, u: float) -> int:
    """The index whose cumulative weight first exceeds ``u`` times the total (never a zero-weight index)."""
    cumulative = np.cumsum(weights, dtype=np.float64)
    i = int(np.searchsorted(cumulative, u * cumulative[-1], side="right"))
    i = min(i, len(weights) - 1)
    while weights[i] == 0.0:  # rounding put the target past the last index with any weight
        i -= 1
    return i


def _within(row: np.ndarray, top: float, width: float) -> np.ndarray:
    """The ids of the tokens whose logit is within ``width`` of the highest (every finite one past _ALL)."""
    return np.flatnonzero(row >= np.float32(top - width)) if width < _ALL else np.flatnonzero(row > -np.inf)


def _sorted(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ids`` and ``values`` highest value first; ties in token order."""
    order = np.argsort(-values, kind="stable")
    return ids[order], values[order]


def _top_k(row: np.ndarray, top: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest finite logits, highest first (all finite ones when fewer), less the highest.

    They lie among the tokens within any width that holds ``k`` of them: the narrowest of a doubling series is
    found first, so the selection runs on a few hundred values rather than the vocabulary."""
    width = _HEAD_WIDTH
    while True:
        ids = _within(row, top, width)
        if len(ids) >= k or width >= _ALL:
            break
        width *= 2.0
    values = row[ids] - np.float32(top)
    if len(ids) > k:
        chosen = np.argpartition(values, len(values) - k)[len(values) - k :]
        chosen.sort()
        ids, values = ids[chosen], values[chosen]
    return _sorted(ids, values)


def _nucleus_of(ids: np.ndarray, values: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The top-p prefix of a kept set (highest first) under the softmax over that set alone."""
    cumulative = np.cumsum(np.exp(values), dtype=np.float64)
    n = int(np.searchsorted(cumulative, top_p * cumulative[-1], side="left")) + 1
    return ids[:n], values[:n]


def _nucleus(row: np.ndarray, top: float, top_p: float, scratch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of highest-probability tokens whose temperature-1 probability reaches ``top_p``.

    The normaliser is exact: one pass of ``exp`` over the row, into ``scratch`` (on a flat distribution such as
    Gemma's the excluded 5% reaches tokens e^-9 below the highest, so no bound on the tail decides the cut). The
    cut is then found without sorting the vocabulary: the tokens within ``width`` of the highest are gathered once
    (doubling the width until they hold the target mass), their masses summed in bands of ``_BAND`` nats, and only
    the band the cut falls in is sorted.
    """
    # Only ratios of weights matter, so while the highest logit allows they are taken relative to e^0 rather than to
    # the highest, saving a pass: no overflow (the sum stays below 262k x e^40) and nothing that matters lost to
    # underflow (below e^-87 against e^-20 or more).
    if _RAW_EXP_LOW <= top <= _RAW_EXP_HIGH:
        np.exp(row, out=scratch)
    else:
        np.subtract(row, np.float32(top), out=scratch)
        np.exp(scratch, out=scratch)
    # float32's pairwise sum: within 1e-6 of the exact normaliser, where the cut moves by a token of weight e^-8.
    target = top_p * float(scratch.sum())
    width = _HEAD_WIDTH
    while True:
        ids = _within(row, top, width)
        weights = scratch[ids]
        if width >= _ALL or float(weights.sum(dtype=np.float64)) >= target:
            break
        width *= 2.0
    values = row[ids] - np.float32(top)
    # Each gathered token's band, then every band's mass in one pass: the cut lies in the first band at which the
    # cumulative mass reaches the target; the bands above it are kept whole.
    bands = np.minimum((values * np.float32(-1.0 / _BAND)).astype(np.int64), _MAX_BANDS - 1)
    masses = np.cumsum(np.bincount(bands, weights=weights, minlength=_MAX_BANDS), dtype=np.float64)
    cut = min(int(np.searchsorted(masses, target, side="left")), _MAX_BANDS - 1)
    above = float(masses[cut - 1]) if cut else 0.0
    inside = bands < cut
    band = bands == cut
    band_ids, band_values, band_weights = ids[band], values[band], weights[band]
    order = np.argsort(-band_values, kind="stable")
    cumulative = above + np.cumsum(band_weights[order], dtype=np.float64)
    n = min(int(np.searchsorted(cumulative, target, side="left")) + 1, len(order))
    taken = order[:n]
    return (
        np.concatenate((ids[inside], band_ids[taken])),
        np.concatenate((values[inside], band_values[taken])),
    )


def _draw_all(row: np.ndarray, top: float, temperature: float, u: float, scratch: np.ndarray) -> int:
    """A draw from ``softmax(row / temperature)`` over the whole vocabulary.

    The head (tokens within ``_DRAW_WIDTH`` tempered nats of the highest) is weighed first, and the tail's mass is
    at most (tail tokens) x e^-_DRAW_WIDTH. When ``u`` falls in the head even at that bound the head decides by
    itself; otherwise the tail's mass is computed exactly and ``u`` picks the head or the tail by their true
    masses. A draw from the tail sums blocks of ``_BLOCK`` probabilities, then searches the one it lands in.
    """
    width = _DRAW_WIDTH * temperature
    ids = _within(row, top, width)
    scale = np.float32(1.0 / temperature)
    weights = np.exp((row[ids] - np.float32(top)) * scale)
    head_mass = float(weights.sum(dtype=np.float64))
    bound = (len(row) - len(ids)) * math.exp(-_DRAW_WIDTH)
    certain = head_mass / (head_mass + bound)  # the head's share at the tail's largest possible mass
    if u < certain:
        return int(ids[_inverse_cdf(weights, u / certain)])
    np.subtract(row, np.float32(top), out=scratch)
    np.multiply(scratch, scale, out=scratch)
    np.exp(scratch, out=scratch)
    scratch[ids] = 0.0
    tail = float(scratch.sum(dtype=np.float64))
    share = head_mass / (head_mass + tail)  # the head's true share, at least ``certain``
    if u < share or tail <= 0.0:
        # u is uniform on [certain, share) here: stretched to [0, 1), the token within the head is as likely as
        # in the branch above.
        return int(ids[_inverse_cdf(weights, (u - certain) / (share - certain) if share > certain else 0.5)])
    rest = (u - share) / (1.0 - share)  # uniform on [0, 1): where in the tail
    # The tail, by blocks: their sums first, then the cumulative sum of the one block the target falls in.
    n = len(scratch)
    full = n - n % _BLOCK
    sums = scratch[:full].reshape(-1, _BLOCK).sum(axis=1, dtype=np.float64)
    if full < n:
        sums = np.append(sums, scratch[full:].sum(dtype=np.float64))
    b = _inverse_cdf(sums, rest)
    cumulative = np.cumsum(sums)
    start = b * _BLOCK
    block = scratch[start : start + _BLOCK].astype(np.float64)
    within = rest * cumulative[-1] - (cumulative[b - 1] if b else 0.0)
    i = min(int(np.searchsorted(np.cumsum(block), within, side="right")), len(block) - 1)
    while block[i] == 0.0:
        i -= 1
    return start + i
