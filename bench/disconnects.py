"""Disconnects: streams abandoned mid-way must free their sequences.

Opens ``--streams`` streamed chat completions (``--concurrency`` at a time), reads a few chunks of each and drops
the connection. Then polls ``num_requests_running`` on the metrics route until it is back to 0 and prints how long
that took against the 2 s limit (as a ratio), the abort count the server recorded, and whether a fresh request is
served normally afterwards.

    .venv/bin/python bench/disconnects.py [--streams 100] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx

from loadgen import free_port, microserve_cmd, running_server
from serverprobe import metric

MODEL = "smollm2-135m-instruct"
LIMIT_S = 2.0


async def abandon(http: httpx.AsyncClient, chunks: int) -> bool:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return False
        seen = 0
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen >= chunks:
                    return True  # leaving the block drops the connection mid-stream
    return False


async def run(url: str, streams: int, concurrency: int) -> int:
    done = 0
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(i: int) -> bool:
            async with semaphore:
                return await abandon(http, 2 + i % 5)

        results = await asyncio.gather(*(one(i) for i in range(streams)))
        done = sum(results)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The chat model alone, as in the figures of docs/benchmarks.md.
    cmd = microserve_cmd(port, "--parallel", str(args.slots))
    with running_server("microserve", cmd, url, f"{url}/v1/health/ready", log_path=args.out / "disconnects.log"):
        started = time.perf_counter()
        aborted = asyncio.run(run(url, args.streams, args.concurrency))
        left_at = time.perf_counter()
        running = metric(url, "num_requests_running")
        while running and time.perf_counter() - left_at < 30:
            time.sleep(0.05)
            running = metric(url, "num_requests_running")
        settle = time.perf_counter() - left_at
        waiting = metric(url, "num_requests_waiting")
        aborts = metric(url, "request_success_total", finished_reason="abort")
        after = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
            timeout=60,
        )
    report = {
        "streams": args.streams,
        "aborted_mid_stream": aborted,
        "abort_wall_s": left_at - started,
        "running_after": running,
        "waiting_after": waiting,
        "seconds_to_zero_running": settle,
        "seconds_to_zero_vs_2s_limit": settle / LIMIT_S,
        "aborts_recorded_by_server": aborts,
        "request_after_status": after.status_code,
    }
    print(json.dumps(report, indent=2))
    if aborted != args.streams or running or waiting or settle > LIMIT_S or after.status_code != 200:
        raise SystemExit("FAIL")


if __name__ == "__main__":
    main()
