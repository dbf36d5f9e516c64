"""Time to sample one row of real logits: microserve's numpy row sampler against llama.cpp's sampler chain.

The rows are the model's own logits for the tokens of a text (one decode with logits for every position). For each
configuration, both samplers draw from every row in turns, interleaved, and the median over ``--reps`` passes of
the per-row time is kept. llama.cpp's figure includes filling its candidate array from the logits, which
``llama_sampler_sample`` does on every call; the row sampler's includes its shaping (bias, penalties) and the draw.

    .venv/bin/python bench/sampler_speed.py [--model gemma-3-270m] [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import llama_cpp as L
import numpy as np

from microserve.catalog.manifest import find_builtin
from microserve.catalog.store import ModelStore
from microserve.engines.base import SamplingParams
from microserve.engines.llamacpp.batch_sampling import RowSampler
from microserve.engines.llamacpp.sampling import _CANDIDATE, _add_shaping
from microserve.settings import Settings

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small lamp and a book of "
    "tide tables. From the gallery she could see the fishing boats returning to the harbor, their lights swaying "
    "on the dark water, and beyond them the long line of the reef where the waves broke white."
)
CONFIGS = {
    "greedy": SamplingParams(max_tokens=1, temperature=0.0),
    "greedy + logit_bias (EOS ban)": SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
    "temperature 0.8": SamplingParams(max_tokens=1, temperature=0.8),
    "temperature 0.8, top_p 0.95": SamplingParams(max_tokens=1, temperature=0.8, top_p=0.95),
    "llama-server's chain (top_k 40, top_p 0.95, min_p 0.05)": SamplingParams(
        max_tokens=1, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05
    ),
    "top_p 0.95 + presence/frequency penalties": SamplingParams(
        max_tokens=1, temperature=0.8, top_p=0.95, presence_penalty=0.5, frequency_penalty=0.5
    ),
}


def logit_rows(path: str, threads: int | None) -> tuple[np.ndarray, list[int]]:
    """The model's logits at every position of TEXT, and the end-of-generation token ids."""
    L.llama_backend_init()
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    data = TEXT.encode()
    ids = (L.llama_token * (len(data) + 8))()
    n = L.llama_tokenize(vocab, data, len(data), ids, len(data) + 8, True, False)
    params = L.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 512, 512, 512
    if threads:
        params.n_threads = params.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, params)
    batch = L.llama_batch_init(n, 0, 1)
    for i in range(n):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = ids[i], i, 1, True
        batch.seq_id[i][0] = 0
    batch.n_tokens = n
    if L.llama_decode(ctx, batch) != 0:
        raise RuntimeError("decode failed")
    rows = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(n, n_vocab)).copy()
    eog = [t for t in range(n_vocab) if L.llama_vocab_is_eog(vocab, t)]
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return rows, eog


def numpy_per_row(rows: np.ndarray, params: SamplingParams, eog: list[int]) -> float:
    """Seconds per row of the row sampler (shaping, draw and bookkeeping), on fresh copies of the rows."""
    sampler = RowSampler(params, n_vocab=rows.shape[1], eog_ids=eog, penalty_window=4096)
    scratch = np.empty(rows.shape[1], dtype=np.float32)
    work = rows.copy()
    started = time.perf_counter()
    for row in work:
        sampler.shape(row)
        token = sampler.pick(row, scratch)
        if token is not None:
            sampler.accept(token)
    return (time.perf_counter() - started) / len(rows)


def llama_per_row(rows: np.ndarray, params: SamplingParams, eog: list[int]) -> float:
    """Seconds per row of llama.cpp's chain, as ``llama_sampler_sample`` runs it: fill the candidates, apply."""
    n_vocab = rows.shape[1]
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    _add_shaping(chain, params, n_vocab=n_vocab, eog_ids=eog, penalty_window=4096, grammar=None)
    pick = L.llama_sampler_init_greedy() if params.temperature <= 0 else L.llama_sampler_init_dist(1)
    L.llama_sampler_chain_add(chain, pick)
    cand = np.empty(n_vocab, dtype=_CANDIDATE)
    ids = np.arange(n_vocab, dtype=np.int32)
    started = time.perf_counter()
    for row in rows:
        cand["id"] = ids
        cand["logit"] = row
        cand["p"] = 0.0
        array = L.llama_token_data_array(
            data=cand.ctypes.data_as(L.llama_token_data_p), size=n_vocab, selected=-1, sorted=False
        )
        L.llama_sampler_apply(chain, ctypes.byref(array))
        L.llama_sampler_accept(chain, int(cand["id"][array.selected]))
    elapsed = time.perf_counter() - started
    L.llama_sampler_free(chain)
    return elapsed / len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    manifest = find_builtin(args.model)
    path = str(ModelStore(Settings().cache_dir).ensure(manifest)) if manifest else args.model
    rows, eog = logit_rows(path, args.threads)
    print(f"{args.model}: {rows.shape[0]} rows of {rows.shape[1]} logits")
    print("| configuration | numpy row sampler µs/row | llama.cpp chain µs/row | llama.cpp / numpy |")
    print("|---|---|---|---|")
    for name, params in CONFIGS.items():
        ours, theirs = [], []
        for _ in range(args.reps):  # interleaved, so that drift falls on both
            ours.append(numpy_per_row(rows, params, eog))
            theirs.append(llama_per_row(rows, params, eog))
        a, b = statistics.median(ours) * 1e6, statistics.median(theirs) * 1e6
        print(f"| {name} | {a:.0f} | {b:.0f} | {b / a:.1f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
