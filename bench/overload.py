"""Overload: a burst of concurrent requests against 2 slots and a small queue.

Every request must be answered (200, or 429 with Retry-After; a 503 only if the queue timeout fires), nothing may
hang, and the server must be ready afterwards. Prints the status counts, answer times per status, and the ratio of
the slowest 429 to one unloaded request measured in the same run: turning a request away must cost far less than
serving one.

    .venv/bin/python bench/overload.py [--requests 256] [--slots 2] [--queue 8] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import httpx

from loadgen import free_port, microserve_cmd, percentile, running_server

MODEL = "smollm2-135m-instruct"


async def burst(url: str, n: int, max_tokens: int) -> list[tuple[int, float, str | None]]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about lighthouses."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def one() -> tuple[int, float, str | None]:
            started = time.perf_counter()
            try:
                response = await http.post("/v1/chat/completions", json=body)
            except httpx.HTTPError as exc:
                return -1, time.perf_counter() - started, type(exc).__name__
            return response.status_code, time.perf_counter() - started, response.headers.get("retry-after")

        return await asyncio.gather(*(one() for _ in range(n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--queue", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The chat model alone, as in the figures of docs/benchmarks.md.
    cmd = microserve_cmd(port, "--parallel", str(args.slots), "--max-queue", str(args.queue))
    log_path = args.out / "overload.log"
    with running_server("microserve", cmd, url, f"{url}/v1/health/ready", log_path=log_path):
        single = asyncio.run(burst(url, 1, args.max_tokens))[0]
        assert single[0] == 200, single
        started = time.perf_counter()
        results = asyncio.run(burst(url, args.requests, args.max_tokens))
        wall = time.perf_counter() - started
        ready = httpx.get(f"{url}/v1/health/ready", timeout=10).status_code
    counts = Counter(status for status, _, _ in results)
    times = {status: [t for s, t, _ in results if s == status] for status in sorted(counts)}
    missing_retry_after = sum(1 for s, _, ra in results if s in (429, 503) and not ra)
    report = {
        "requests": args.requests,
        "slots": args.slots,
        "queue": args.queue,
        "status_counts": {str(k): v for k, v in sorted(counts.items())},
        "client_answer_time_s": {
            str(s): {"p50": percentile(ts, 50), "p99": percentile(ts, 99), "max": max(ts)} for s, ts in times.items()
        },
        "burst_wall_s": wall,
        "unloaded_request_s": single[1],
        "missing_retry_after": missing_retry_after,
        "ready_after": ready,
    }
    # The server's own view (its request log): time from request to response, without the client's overhead.
    server_ms: dict[str, list[float]] = {}
    for line in log_path.read_text().splitlines():
        if "microserve.access" in line and "duration_ms=" in line:
            status = line.split("status=")[1].split()[0]
            server_ms.setdefault(status, []).append(float(line.split("duration_ms=")[1].split()[0]))
    report["server_side_ms"] = {
        s: {"p50": percentile(v, 50), "max": max(v)} for s, v in sorted(server_ms.items()) if s in ("200", "429", "503")
    }
    if 429 in times:
        report["slowest_429_vs_unloaded_request"] = max(times[429]) / single[1]
    print(json.dumps(report, indent=2))
    lost = sum(v for k, v in counts.items() if k not in (200, 429, 503))
    if lost or missing_retry_after or ready != 200:
        raise SystemExit(f"FAIL: {lost} requests without a 200/429/503, {missing_retry_after} without Retry-After")


if __name__ == "__main__":
    main()
