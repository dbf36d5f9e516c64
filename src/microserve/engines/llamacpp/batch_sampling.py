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
provably inside (top-p needs the full softmax normaliser, one pass of ``exp``); sampling the whole vocabulary
(temperature alone) sums block by block and searches only the block the uniform lands in. Probabilities are
computed in float32 and accumulated in float64, as precise as llama.cpp's own sampler.

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
_TAIL_WIDTH = 20.0  # the head: tokens within this many nats of the highest (tempered) logit; each beyond weighs
#                     less than e^-20 of the highest, and their total is bounded before it is ever computed
_FIRST_WIDTH = 6.0  # the top-p cut is first looked for among the tokens this close to the highest logit
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

        Two uniforms per token, always: one chooses between the head and the tail of the distribution, one the
        token within the part chosen. ``scratch`` is a float32 buffer of the row's length the draw may overwrite.
        """
        if not math.isfinite(top):
            return None
        u_part, u_token = self._rng.random(2)
        temperature = self.temperature
        width = _TAIL_WIDTH * max(1.0, temperature)
        # The head: every token within ``width`` of the highest logit, with its logit less the highest.
        ids = np.flatnonzero(row >= np.float32(top - width))
        values = row[ids] - np.float32(top)
        truncated = False  # once true, (ids, values) is the kept set, highest first
        if self.top_k:
            ids, values = _top_k(row, top, self.top_k, ids, values)
            truncated = True
        if self.top_p < 1.0:
            if truncated:
                ids, values = _nucleus_of(ids, values, self.top_p)
            else:
                ids, values = _nucleus(row, top, self.top_p, ids, values, width, scratch)
                truncated = True
        if self._log_min_p is not None:
            # llama.cpp's comparison, in float32: logit >= highest + log(min_p).
            floor = np.float32(top) + self._log_min_p
            if not truncated and floor < np.float32(top - width):
                ids = np.flatnonzero(row >= floor)
                values = row[ids] - np.float32(top)
            keep = row[ids] >= floor
            ids, values = ids[keep], values[keep]
            truncated = True
        if not truncated:
            return _draw_all(row, top, temperature, ids, values, width, u_part, u_token, scratch)
        return int(ids[_inverse_cdf(np.exp(values / np.float32(temperature)), u_token)])


def _inverse_cdf(weights: np.ndarray, u: float) -> int:
    """The index whose cumulative weight first exceeds ``u`` times the total (never a zero-weight index)."""
    cumulative = np.cumsum(weights, dtype=np.float64)
    i = int(np.searchsorted(cumulative, u * cumulative[-1], side="right"))
    i = min(i, len(weights) - 1)
    while weights[i] == 0.0:  # rounding put the target past the last index with any weight
        i -= 1
    return i


def _sorted(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ids`` and ``values`` highest value first; ties in token order."""
    order = np.argsort(-values, kind="stable")
    return ids[order], values[order]


def _top_k(row: np.ndarray, top: float, k: int, ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest logits, highest first: from the head if it holds that many, else from the whole row."""
    if len(ids) < k:
        ids = np.argpartition(row, len(row) - k)[len(row) - k :]
        ids.sort()
        values = row[ids] - np.float32(top)
    elif len(ids) > k:
        chosen = np.argpartition(values, len(values) - k)[len(values) - k :]
        chosen.sort()
        ids, values = ids[chosen], values[chosen]
    return _sorted(ids, values)


def _nucleus_of(ids: np.ndarray, values: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The top-p prefix of a kept set (highest first) under the softmax over that set alone."""
    cumulative = np.cumsum(np.exp(values), dtype=np.float64)
    n = int(np.searchsorted(cumulative, top_p * cumulative[-1], side="left")) + 1
    return ids[:n], values[:n]


def _tail_mass(row: np.ndarray, top: float, scale: float, head: np.ndarray, scratch: np.ndarray) -> float:
    """The exact mass ``sum(exp((row - top) * scale))`` of the tokens outside ``head``; leaves their weights in
    ``scratch`` and zeros at the head."""
    np.subtract(row, np.float32(top), out=scratch)
    if scale != 1.0:
        np.multiply(scratch, np.float32(scale), out=scratch)
    np.exp(scratch, out=scratch)
    scratch[head] = 0.0
    return float(scratch.sum(dtype=np.float64))


def _nucleus(
    row: np.ndarray,
    top: float,
    top_p: float,
    ids: np.ndarray,
    values: np.ndarray,
    width: float,
    scratch: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of highest-probability tokens whose temperature-1 probability reaches ``top_p``, from the
    head (``ids``, ``values``: every token within ``width`` of the highest logit).

    The normaliser is the head's mass plus the tail's, and the tail's is at most (tail tokens) x exp(-width). When
    the cut is the same at both ends of that range the tail is never computed; otherwise it is, exactly.
    """
    weights = np.exp(values)
    head_mass = float(weights.sum(dtype=np.float64))
    bound = (len(row) - len(ids)) * math.exp(-width)
    low, high = top_p * head_mass, top_p * (head_mass + bound)
    if head_mass < high:
        # The nucleus may reach into the tail (a flat distribution): the exact normaliser, then wider candidate
        # sets until one holds the target mass.
        target = top_p * (head_mass + _tail_mass(row, top, 1.0, ids, scratch))
        wider = width
        while True:
            wider *= 2.0
            ids = np.flatnonzero(row >= np.float32(top - wider)) if wider < 1e3 else np.flatnonzero(row > -np.inf)
            values = row[ids] - np.float32(top)
            weights = np.exp(values)
            if wider >= 1e3 or float(weights.sum(dtype=np.float64)) >= target:
                break
        order = np.argsort(-values, kind="stable")
        n = int(np.searchsorted(np.cumsum(weights[order], dtype=np.float64), target, side="left")) + 1
        kept = order[: min(n, len(order))]
        return ids[kept], values[kept]
    # Sort only as much of the head as the cut can need: the tokens within a narrower width, if they reach the
    # target however heavy the tail.
    near_ids, near_values, near_weights = ids, values, weights
    for narrow in (_FIRST_WIDTH, 2 * _FIRST_WIDTH):
        if narrow < width:
            near = values >= -narrow
            if float(weights[near].sum(dtype=np.float64)) >= high:
                near_ids, near_values, near_weights = ids[near], values[near], weights[near]
                break
    order = np.argsort(-near_values, kind="stable")
    cumulative = np.cumsum(near_weights[order], dtype=np.float64)
    n = int(np.searchsorted(cumulative, low, side="left")) + 1
    if n != int(np.searchsorted(cumulative, high, side="left")) + 1:
        # The tail's mass decides where the cut falls: compute it.
        mass = head_mass + _tail_mass(row, top, 1.0, ids, scratch)
        n = int(np.searchsorted(cumulative, top_p * mass, side="left")) + 1
    kept = order[: min(n, len(order))]
    return near_ids[kept], near_values[kept]


def _draw_all(
    row: np.ndarray,
    top: float,
    temperature: float,
    ids: np.ndarray,
    values: np.ndarray,
    width: float,
    u_part: float,
    u_token: float,
    scratch: np.ndarray,
) -> int:
    """A draw from ``softmax(row / temperature)`` over the whole vocabulary, given its head (``ids``, ``values``:
    every token within ``width`` of the highest logit, whose tempered weight is at least exp(-width / temperature)).

    ``u_part`` picks the head with probability head mass / total mass: certainly the head when it is below the
    head's share at the tail's largest possible mass, otherwise the tail's mass is computed exactly. ``u_token``
    then picks within the part, by inverse CDF.
    """
    weights = np.exp(values / np.float32(temperature))
    head_mass = float(weights.sum(dtype=np.float64))
    bound = (len(row) - len(ids)) * math.exp(-width / temperature)
    if u_part * (head_mass + bound) < head_mass:
        return int(ids[_inverse_cdf(weights, u_token)])
    tail = _tail_mass(row, top, 1.0 / temperature, ids, scratch)
    if u_part * (head_mass + tail) < head_mass or tail <= 0.0:
        return int(ids[_inverse_cdf(weights, u_token)])
    # The tail, by blocks: their sums first, then the cumulative sum of the one block the target falls in.
    n = len(scratch)
    full = n - n % _BLOCK
    sums = scratch[:full].reshape(-1, _BLOCK).sum(axis=1, dtype=np.float64)
    if full < n:
        sums = np.append(sums, scratch[full:].sum(dtype=np.float64))
    b = _inverse_cdf(sums, u_token)
    start = b * _BLOCK
    block = scratch[start : start + _BLOCK].astype(np.float64)
    cumulative = np.cumsum(sums)
    rest = u_token * cumulative[-1] - (cumulative[b - 1] if b else 0.0)
    i = min(int(np.searchsorted(np.cumsum(block), rest, side="right")), len(block) - 1)
    while block[i] == 0.0:
        i -= 1
    return start + i
