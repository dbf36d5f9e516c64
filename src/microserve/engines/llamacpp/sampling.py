"""llama.cpp sampler chains built from request parameters.

All per-vocabulary work (penalties, biases, top-k/p, the draw) happens inside llama.cpp; Python only assembles the
chain once per request.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import llama_cpp as L

from microserve.engines.base import SamplingParams

_NEG_INF = float("-inf")


def build_sampler(
    params: SamplingParams, *, n_vocab: int, eog_ids: Iterable[int], penalty_window: int
) -> L.llama_sampler_p:
    """A sampler chain for one sequence; the caller frees it with ``llama_sampler_free``."""
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    biases = dict(params.logit_bias)
    if params.ignore_eos:
        # End-of-generation tokens are banned outright, as llama-server does, so the sequence runs to max_tokens.
        biases.update({token: _NEG_INF for token in eog_ids})
    if biases:
        array = (L.llama_logit_bias * len(biases))(*(L.llama_logit_bias(t, b) for t, b in biases.items()))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(n_vocab, len(biases), array))
    if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
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
    if params.temperature <= 0.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(params.min_p, 1))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain
