"""Decode rate of one sequence with logprobs and with grammars, against plain sampling in the same run.

In-process on the llama.cpp engine (no HTTP), greedy, 64 output tokens per run, median of ``--reps`` runs per
configuration, interleaved. Plain sampling is the peer; the limit checked: a grammar-constrained sequence keeps at least
0.7× and a logprobs sequence at least 0.8× the plain decode rate.

    .venv/bin/python bench/sampling_overhead.py [--model smollm2-135m-instruct] [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from microserve.catalog.manifest import find_builtin
from microserve.catalog.store import ModelStore
from microserve.engines.base import GenerationRequest, Guide, SamplingParams
from microserve.engines.llamacpp.engine import LlamaCppConfig, LlamaCppEngine
from microserve.settings import Settings

TOKENS = 64
FLOORS = {"logprobs top 5": 0.8, "regex [a-z ]{400}": 0.7, "json schema": 0.7}
SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string"}, "words": {"type": "array", "items": {"type": "string"}}},
    "required": ["story", "words"],
}


async def rate(engine: LlamaCppEngine, prompt: list[int], tag: str, **extra: object) -> tuple[float, int]:
    """Decode tok/s after the first token (prefill excluded) and the number of tokens produced."""
    params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos="guide" not in extra)
    request = GenerationRequest(tag, prompt, params, **extra)  # type: ignore[arg-type]
    first = None
    produced = 0
    async for delta in engine.generate(request):
        if first is None:
            first = time.perf_counter()
        produced = delta.completion_tokens
    assert first is not None
    return ((produced - 1) / (time.perf_counter() - first) if produced > 1 else 0.0), produced


async def main(model: str, reps: int, threads: int | None) -> int:
    manifest = find_builtin(model)
    assert manifest is not None, model
    path = ModelStore(Settings().cache_dir).path_for(manifest)
    engine = LlamaCppEngine(LlamaCppConfig(path=str(path), model_id=model, parallel=2, threads=threads))
    await engine.start()
    try:
        prompt = engine.encode_prompt("Write a long story about a lighthouse keeper and list its key words.")
        configs: dict[str, dict[str, object]] = {
            "plain": {},
            "logprobs top 5": {"logprobs": 5},
            "regex [a-z ]{400}": {"guide": Guide("regex", "[a-z ]{400}", "bench")},
            "json schema": {"guide": Guide("json", SCHEMA, "bench")},
        }
        for extra in configs.values():
            guide = extra.get("guide")
            if isinstance(guide, Guide):
                await engine.check_guide(guide)
        await rate(engine, prompt, "warm-up")
        # Configurations interleaved within each repetition, so that drift in machine load hits all alike.
        samples: dict[str, list[float]] = {name: [] for name in configs}
        produced: dict[str, int] = {}
        for i in range(reps):
            for name, extra in configs.items():
                tok_s, produced[name] = await rate(engine, prompt, f"{name}-{i}", **extra)
                samples[name].append(tok_s)
        results = {name: (statistics.median(values), produced[name]) for name, values in samples.items()}
    finally:
        await engine.shutdown()
    base = results["plain"][0]
    verdict = 0
    print("| configuration | tokens | decode tok/s | × plain | floor |")
    print("|---|---|---|---|---|")
    for name, (tok_s, produced) in results.items():
        floor = FLOORS.get(name)
        ok = floor is None or tok_s / base >= floor
        verdict |= 0 if ok else 1
        mark = "" if floor is None else f"{floor} {'ok' if ok else 'BELOW'}"
        print(f"| {name} | {produced} | {tok_s:.1f} | {tok_s / base:.2f} | {mark} |")
    return verdict


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.model, args.reps, args.threads)))
