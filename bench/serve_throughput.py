"""Aggregate output tokens/s through the HTTP server at concurrency 1, 4, 8 and 16.

Closed-loop streamed ``/v1/completions`` load (64 output tokens, EOS ignored, c×4 requests per level) against
``microserve serve`` on each built-in model; prints tok/s, TTFT and inter-token latency per level and the ratio
to the single-stream figure, which is what continuous batching buys. The limit checked: on gemma-3-270m at c=8
the aggregate must reach 1.6× the c=1 figure.

    .venv/bin/python bench/serve_throughput.py [--models gemma-3-270m smollm2-135m-instruct] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from loadgen import LoadResult, free_port, microserve_cmd, run_load, running_server

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle on a stormy night."
LEVELS = (1, 4, 8, 16)
BATCHING_FLOOR = 1.6  # gemma-3-270m at c=8 vs c=1


def bench_model(model: str, threads: int | None, out: Path) -> list[LoadResult]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = microserve_cmd(port, "--model", model, "--parallel", "16")
    if threads:
        cmd += ["--threads", str(threads)]
    results = []
    with running_server("microserve", cmd, url, f"{url}/v1/health/ready", log_path=out / f"serve-{model}.log"):
        asyncio.run(run_load(url, model, PROMPT, 2, 2, max_tokens=8))  # warm caches and allocators
        for c in LEVELS:
            result = asyncio.run(run_load(url, model, PROMPT, c, c * 4, max_tokens=64))
            if result.n_failed:
                raise SystemExit(f"{model} c={c}: {result.n_failed} requests failed: {result.errors}")
            results.append(result)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m-instruct"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    verdict = 0
    report = {}
    print("| model | c | tok/s | × c=1 | TTFT p50 ms | TTFT p90 ms | ITL p50 ms | ITL p90 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        results = bench_model(model, args.threads, args.out)
        base = results[0].tok_s
        for r in results:
            print(
                f"| {model} | {r.concurrency} | {r.tok_s:.1f} | {r.tok_s / base:.2f} | {r.ttft_p50_ms:.0f} | "
                f"{r.ttft_p90_ms:.0f} | {r.itl_p50_ms:.1f} | {r.itl_p90_ms:.1f} |"
            )
        report[model] = [r.summary() for r in results]
        if model == "gemma-3-270m":
            ratio = results[LEVELS.index(8)].tok_s / base
            ok = ratio >= BATCHING_FLOOR
            verdict |= 0 if ok else 1
            print(f"\ngemma-3-270m c=8 / c=1 = {ratio:.2f} (floor {BATCHING_FLOOR}): {'ok' if ok else 'BELOW'}\n")
    (args.out / "serve_throughput.json").write_text(json.dumps(report, indent=2))
    return verdict


if __name__ == "__main__":
    raise SystemExit(main())
