"""Prompt logprobs: each prompt token's log-probability given the tokens before it, from the prefill's logits.

Only sequences that ask for them request logits at every prompt position (llama.cpp computes the output rows of
the positions flagged in the batch and no others), so a prompt that is not scored costs nothing more. The
distribution is the model's own: a log-softmax of the raw logits, at temperature 1, with no penalty, bias or
grammar, which is what OpenAI's legacy ``echo`` and vLLM's ``prompt_logprobs`` report.
"""

from __future__ import annotations

from collections.abc import Sequence

import llama_cpp as L
import numpy as np

# (the scored token, its logprob, the top alternatives as (token, logprob), most likely first)
Score = tuple[int, float, tuple[tuple[int, float], ...]]


def score_rows(ctx: L.llama_context_p, rows: Sequence[tuple[int, int]], n_vocab: int, top: int) -> list[Score]:
    """Score ``(batch index, next token)`` pairs: the logprob of the next token under the logits at that index."""
    out: list[Score] = []
    for idx, token in rows:
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, idx), shape=(n_vocab,)).astype(np.float64)
        peak = logits.max()
        log_total = peak + np.log(np.exp(logits - peak).sum())
        alternatives: tuple[tuple[int, float], ...] = ()
        if top > 0:
            k = min(top, n_vocab)
            best = np.argpartition(-logits, k - 1)[:k]
            best = best[np.argsort(-logits[best], kind="stable")]
            alternatives = tuple((int(t), float(logits[t] - log_total)) for t in best)
        out.append((token, float(logits[token] - log_total), alternatives))
    return out
