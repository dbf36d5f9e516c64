"""Soak: many streamed requests at steady concurrency; no request may fail and memory must not creep.

Runs ``--requests`` streamed completions (16 output tokens, prompts varied so the prefix cache keeps turning
over) from ``--concurrency`` closed-loop clients in ten rounds, sampling the server's RSS after a warm-up and after
each round. Prints errors, throughput and RSS at start and end; the limit is RSS growth under 10% (printed as the
end/start ratio against 1.10).

    .venv/bin/python bench/soak.py [--requests 2000] [--concurrency 16] [--slots 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from loadgen import free_port, microserve_cmd, run_load, running_server
from serverprobe import metric, rss_mib

MODEL = "smollm2-135m-instruct"
GROWTH_LIMIT = 1.10
ROUNDS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The queue holds every client that does not have a slot, so no request is turned away.
    # The chat model alone, as in the figures of docs/benchmarks.md.
    cmd = microserve_cmd(port, "--parallel", str(args.slots), "--max-queue", str(args.concurrency))
    prompts = [f"Request {i}: describe the number {i} in one sentence." for i in range(97)]
    with running_server("microserve", cmd, url, f"{url}/v1/health/ready", log_path=args.out / "soak.log") as server:
        pid = server.proc.pid
        warm = asyncio.run(run_load(url, MODEL, prompts, args.concurrency, args.concurrency * 4, args.max_tokens))
        rss_start = rss_mib(pid)
        samples = [rss_start]
        ok = failed = tokens = 0
        errors: set[str] = set()
        started = time.perf_counter()
        per_round = args.requests // ROUNDS
        for r in range(ROUNDS):
            n = per_round if r < ROUNDS - 1 else args.requests - per_round * (ROUNDS - 1)
            result = asyncio.run(run_load(url, MODEL, prompts, args.concurrency, n, args.max_tokens))
            ok += result.n_ok
            failed += result.n_failed
            tokens += result.completion_tokens
            errors.update(result.errors)
            samples.append(rss_mib(pid))
        wall = time.perf_counter() - started
        rejected = metric(url, "num_requests_rejected_total")
        running = metric(url, "num_requests_running")
    report = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "warmup_failed": warm.n_failed,
        "ok": ok,
        "failed": failed,
        "lost": args.requests - ok - failed,
        "errors": sorted(errors),
        "rejected_by_server": rejected,
        "running_after": running,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "rss_mib_start": rss_start,
        "rss_mib_end": samples[-1],
        "rss_mib_max": max(samples),
        "rss_end_vs_start": samples[-1] / rss_start,
        "growth_limit": GROWTH_LIMIT,
        "rss_mib_per_round": [round(s, 1) for s in samples],
    }
    print(json.dumps(report, indent=2))
    if failed or ok != args.requests or samples[-1] / rss_start >= GROWTH_LIMIT:
        raise SystemExit("FAIL")


if __name__ == "__main__":
    main()
