"""The sampling step of a batch, and llama.cpp sampler chains for the sequences that need them.

Plain requests (no grammar, no logprobs) are sampled by :mod:`.batch_sampling`, with numpy on the step's logits
array: the exact distribution of llama.cpp's chain, without a per-sequence copy of the vocabulary.

Requests with a grammar or with logprobs take the *inspected* path: the chain's shaping stages (bias, penalties,
grammar, top-k/p, min-p, temperature) are applied to a candidate array this module owns, the draw is made by a
separate sampler, and only a token with a finite logit is accepted. That guard matters: llama.cpp aborts the
process if a grammar is asked to accept a token it forbids, which would otherwise happen when every candidate
is masked. The same array gives the logprobs, with numpy over the vocabulary, for the requests that ask.

Logprobs are those of the distribution the token was drawn from: after logit bias, penalties, the grammar mask,
top-k/top-p/min-p truncation and temperature. Greedy requests (temperature 0) report the distribution at
temperature 1 after bias, penalties and grammar, whose top-1 token is the greedy pick.
"""

from __future__ import annotations

import ctypes
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import llama_cpp as L
import numpy as np

from microserve.engines.base import SamplingParams
from microserve.engines.llamacpp.batch_sampling import RowSampler, has_penalties, request_biases

_CANDIDATE = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _CANDIDATE.itemsize == ctypes.sizeof(L.llama_token_data)


@dataclass(frozen=True, slots=True)
class Sampled:
    """One sampled token and, if requested, its logprob and the top alternatives (id, logprob)."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class SequenceSampler:
    """The sampling state of one inspected sequence; the caller frees it with :meth:`free` on the engine thread.

    ``chain`` holds the shaping stages; ``pick`` is the separate draw. With a grammar and no logprobs, ``fast`` is
    the same chain without the grammar: a token drawn from it and accepted by the grammar is kept (one candidate
    checked instead of the whole vocabulary, as llama-server does); otherwise the token is drawn again with the
    grammar applied. Greedy picks are unchanged by this, and sampled ones follow the masked distribution exactly
    when no top-k/p truncation is involved.
    """

    def __init__(
        self,
        chain: L.llama_sampler_p,
        *,
        pick: L.llama_sampler_p,
        n_vocab: int,
        top_logprobs: int | None,
        grammar: L.llama_sampler_p | None = None,
        fast: L.llama_sampler_p | None = None,
    ) -> None:
        self._chain = chain
        self._pick = pick
        self._n_vocab = n_vocab
        self._top = top_logprobs
        self._grammar = grammar  # borrowed: owned by the chain
        self._fast = fast
        self._candidates: np.ndarray | None = None
        self._one = np.empty(1, dtype=_CANDIDATE)

    def _fill(self, ctx: L.llama_context_p, idx: int) -> L.llama_token_data_array:
        n = self._n_vocab
        if self._candidates is None:
            self._candidates = np.empty(n, dtype=_CANDIDATE)
        cand = self._candidates
        cand["id"] = np.arange(n, dtype=np.int32)
        cand["logit"] = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, idx), shape=(n,))
        cand["p"] = 0.0
        return L.llama_token_data_array(
            data=cand.ctypes.data_as(L.llama_token_data_p), size=n, selected=-1, sorted=False
        )

    def _accept(self, token: int) -> None:
        L.llama_sampler_accept(self._chain, token)
        if self._fast is not None:
            L.llama_sampler_accept(self._fast, token)

    def _try_fast(self, ctx: L.llama_context_p, idx: int) -> int | None:
        """A token drawn without the grammar, if the grammar allows it."""
        assert self._fast is not None and self._pick is not None and self._grammar is not None
        array = self._fill(ctx, idx)
        L.llama_sampler_apply(self._fast, ctypes.byref(array))
        L.llama_sampler_apply(self._pick, ctypes.byref(array))
        assert self._candidates is not None
        selected = int(array.selected)
        if not 0 <= selected < array.size:
            return None
        chosen = self._candidates[selected]
        if not np.isfinite(chosen["logit"]):
            return None
        one = self._one
        one[0] = chosen
        single = L.llama_token_data_array(
            data=one.ctypes.data_as(L.llama_token_data_p), size=1, selected=-1, sorted=False
        )
        L.llama_sampler_apply(self._grammar, ctypes.byref(single))
        return int(one["id"][0]) if np.isfinite(one["logit"][0]) else None

    def sample(self, ctx: L.llama_context_p, idx: int) -> Sampled | None:
        """Sample from the logits at batch index ``idx``; None when no token is allowed (a dead-end grammar)."""
        if self._fast is not None:
            token = self._try_fast(ctx, idx)
            if token is not None:
                self._accept(token)
                return Sampled(token)
        array = self._fill(ctx, idx)
        L.llama_sampler_apply(self._chain, ctypes.byref(array))
        L.llama_sampler_apply(self._pick, ctypes.byref(array))
        assert self._candidates is not None
        kept = self._candidates[: array.size]
        logits = kept["logit"].astype(np.float64)
        finite = np.isfinite(logits)
        if not finite.any():
            return None
        selected = int(array.selected)
        if not (0 <= selected < len(kept)) or not finite[selected]:
            # The draw can land on a masked candidate only at the edge of floating point; take the best instead.
            selected = int(np.argmax(np.where(finite, logits, -np.inf)))
        token = int(kept["id"][selected])
        self._accept(token)
        if self._top is None:
            return Sampled(token)
        top_logit = logits[finite].max()
        log_total = top_logit + np.log(np.exp(logits[finite] - top_logit).sum())
        alternatives: tuple[tuple[int, float], ...] = ()
        k = min(self._top, int(finite.sum()))
        if k > 0:
            masked = np.where(finite, logits, -np.inf)
            best = np.argpartition(-masked, k - 1)[:k]
            best = best[np.argsort(-masked[best], kind="stable")]
            alternatives = tuple((int(kept["id"][i]), float(logits[i] - log_total)) for i in best)
        return Sampled(token, float(logits[selected] - log_total), alternatives)

    def free(self) -> None:
        """Free the llama.cpp samplers (the chain owns the grammar sampler added to it)."""
        L.llama_sampler_free(self._chain)
        if self._fast is not None:
            L.llama_sampler_free(self._fast)
        L.llama_sampler_free(self._pick)
        self._candidates = None


def _add_shaping(
    chain: L.llama_sampler_p,
    params: SamplingParams,
    *,
    n_vocab: int,
    eog_ids: Iterable[int],
    penalty_window: int,
    grammar: L.llama_sampler_p | None,
) -> None:
    """Bias, penalties, the grammar (if any) and, unless greedy, truncation and temperature."""
    biases = request_biases(params, eog_ids)
    if biases:
        array = (L.llama_logit_bias * len(biases))(*(L.llama_logit_bias(t, b) for t, b in biases.items()))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(n_vocab, len(biases), array))
    if has_penalties(params):
        L.llama_sampler_chain_add(
            chain,
            L.llama_sampler_init_penalties(
                n_vocab,
                penalty_window,
                params.repetition_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            ),
        )
    if grammar is not None:
        L.llama_sampler_chain_add(chain, grammar)
    if params.temperature <= 0.0:
        return
    if params.top_k > 0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(params.min_p, 1))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params.temperature))


def build_sampler(
    params: SamplingParams,
    *,
    n_vocab: int,
    eog_ids: Iterable[int],
    penalty_window: int,
    grammar: L.llama_sampler_p | None = None,
    top_logprobs: int | None = None,
    choice: int = 0,
) -> RowSampler | SequenceSampler:
    """The sampler of one sequence; ``grammar`` (owned from here on) constrains it, ``top_logprobs`` asks for
    logprobs with that many alternatives (0: the sampled token's only). Without either, the numpy row sampler,
    whose generator ``choice`` (the index among the request's ``n``) sets apart from its siblings'."""
    eog = list(eog_ids)
    if grammar is None and top_logprobs is None:
        return RowSampler(params, n_vocab=n_vocab, eog_ids=eog, penalty_window=penalty_window, choice=choice)
    shaping = {"n_vocab": n_vocab, "eog_ids": eog, "penalty_window": penalty_window}
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    _add_shaping(chain, params, grammar=grammar, **shaping)  # type: ignore[arg-type]
    if params.temperature <= 0.0:
        pick = L.llama_sampler_init_greedy()
    else:
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        pick = L.llama_sampler_init_dist(seed & 0xFFFFFFFF)
    fast = None
    if grammar is not None and top_logprobs is None:
        fast = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        _add_shaping(fast, params, grammar=None, **shaping)  # type: ignore[arg-type]
    return SequenceSampler(chain, pick=pick, n_vocab=n_vocab, top_logprobs=top_logprobs, grammar=grammar, fast=fast)


class StepSampler:
    """Samples one step's rows: plain sequences on the step's logits array, the others through their chains."""

    def __init__(self, n_vocab: int) -> None:
        self._n_vocab = n_vocab
        self._scratch = np.empty(n_vocab, dtype=np.float32)

    def sample(
        self, ctx: L.llama_context_p, rows: Sequence[tuple[RowSampler | SequenceSampler, int]]
    ) -> list[Sampled | None]:
        """One result per row, in order; None where no token is allowed.

        ``rows`` pairs each sequence's sampler with the batch index of its token. A plain sequence's row of logits
        is shaped in place (it is the sequence's own, and the next decode overwrites it).
        """
        results: list[Sampled | None] = []
        for sampler, idx in rows:
            if isinstance(sampler, SequenceSampler):
                results.append(sampler.sample(ctx, idx))
                continue
            # llama.cpp maps the batch index to its row: scored prompt positions have rows of their own too.
            row = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, idx), shape=(self._n_vocab,))
            sampler.shape(row)
            token = sampler.pick(row, self._scratch)
            if token is None:
                results.append(None)
                continue
            sampler.accept(token)
            results.append(Sampled(token))
        return results
