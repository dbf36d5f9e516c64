"""The llama.cpp engine's decode step time under a closed-loop load, in-process, one configuration per process.

Loads the engine with ``--parallel`` slots of ``--context`` tokens, runs one warm-up round and then the measured
round of the same shape (c = ``--concurrency`` workers, prompts and outputs of mixed lengths, temperature 0.8,
top_p 0.95, EOS ignored) and prints one JSON line: the mean time of the steps that carried no prompt token
(decode and sampling), the sampling's share, and the output tok/s. One engine per process: a second llama.cpp
engine in the same process would bring a second OpenMP team, which slows both (see docs/benchmarks.md).

``bench/vs_llama_server.py`` runs it for 16 x 512 and 16 x 4,096 in turns; by hand::

    .venv/bin/python bench/engine_step_time.py --model gemma-3-270m --context 4096 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time

from microserve.catalog.manifest import find_builtin
from microserve.catalog.store import ModelStore
from microserve.engines.base import GenerationRequest, SamplingParams
from microserve.engines.llamacpp.engine import LlamaCppConfig, LlamaCppEngine
from microserve.settings import Settings

WORDS = "river city market winter light music garden letter story window mountain village road morning".split()


def shapes(seed: int, n: int, prompt: tuple[int, int], output: tuple[int, int]) -> list[tuple[int, int]]:
    """``n`` (prompt tokens, output tokens): prompts log-uniform, outputs uniform over their ranges."""
    rng = random.Random(seed)
    lo, hi = math.log(prompt[0]), math.log(prompt[1])
    return [(round(math.exp(rng.uniform(lo, hi))), rng.randint(*output)) for _ in range(n)]


async def measure(args: argparse.Namespace) -> dict[str, float]:
    manifest = find_builtin(args.model)
    path = str(ModelStore(Settings().cache_dir).ensure(manifest)) if manifest else args.model
    config = LlamaCppConfig(
        path=path, model_id=args.model, parallel=args.parallel, context_length=args.context, threads=args.threads
    )
    engine = LlamaCppEngine(config)
    await engine.start()
    scheduler = engine._scheduler
    assert scheduler is not None
    rng = random.Random(args.seed)

    def prompt_of(n: int) -> list[int]:
        # Distinct leading tokens, so that no request reuses another's prefix.
        text = f"{rng.randrange(10**9)} " + " ".join(rng.choice(WORDS) for _ in range(n))
        return engine.tokenize(text, add_special=True)[:n]

    async def round_of(seed: int, requests: int) -> tuple[float, float, float]:
        pending = [(prompt_of(p), m) for p, m in shapes(seed, requests, args.prompt, args.output)]
        steps, seconds, sampling = scheduler.decode_steps, scheduler.decode_seconds, scheduler.sample_seconds
        produced = 0

        async def worker() -> None:
            nonlocal produced
            while pending:
                prompt, max_tokens = pending.pop()
                params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, ignore_eos=True)
                async for delta in engine.generate(GenerationRequest("step", prompt, params)):
                    if delta.finish_reason:
                        produced += delta.completion_tokens

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
        n = max(1, scheduler.decode_steps - steps)
        return (
            (scheduler.decode_seconds - seconds) / n * 1e3,
            (scheduler.sample_seconds - sampling) / n * 1e3,
            produced / wall,
        )

    try:
        await round_of(args.seed + 1, args.concurrency)  # warm-up: first-touch faults and lazy allocations
        step_ms, sample_ms, tok_s = await round_of(args.seed, args.requests)
    finally:
        await engine.shutdown()
    return {"context": args.context, "decode_step_ms": step_ms, "sample_ms": sample_ms, "tok_s": tok_s}


def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--context", type=int, default=4096, help="tokens per slot")
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt", type=_pair, default=(32, 192), help="prompt token range (default 32,192)")
    parser.add_argument("--output", type=_pair, default=(32, 160), help="output token range (default 32,160)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.prompt[1] + args.output[1] > args.context:
        raise SystemExit("the longest prompt plus output must fit in --context")
    print(json.dumps(asyncio.run(measure(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
