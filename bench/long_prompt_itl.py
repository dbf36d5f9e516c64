"""Inter-token latency of running streams while a 1,500-token prompt is prefilled.

Four streams decode on ``microserve serve``; once they run steadily a fifth request arrives with a ~1,500-token
prompt. The gaps between the running streams' tokens are split into those before it arrived (quiet) and those
while it was prefilled (from its arrival to its first token), and the p90 of each is compared. The run is made
with the default (adaptive) per-step prompt budget and with the cap lifted to the whole batch (256 tokens),
which is how a scheduler without a per-step prefill bound behaves. The limit checked: p90 during prefill < 3x
the quiet p90.

    .venv/bin/python bench/long_prompt_itl.py [--model gemma-3-270m] [--caps 0,256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from loadgen import free_port, microserve_cmd, percentile, running_server

STREAMS = 4
LIMIT = 3.0


SENTENCES = (
    "The keeper climbed the stairs at dusk to light the lamp.",
    "Ships passed the rocks safely because the beam turned all night.",
    "In the morning he wrote the weather and the passing vessels in the log.",
    "Storms broke windows and flooded the store room more than once.",
)


def long_prompt(sentences: int, salt: int) -> str:
    """About ``13 * sentences`` tokens that share no prefix with any other prompt of the run."""
    body = " ".join(SENTENCES[i % len(SENTENCES)] for i in range(sentences))
    return f"Record {salt}. Summarise this log: {body}"


async def stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], times: list[float]) -> dict[str, Any]:
    """Stream a completion, appending the arrival time of every text chunk to ``times``; return its usage."""
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    usage: dict[str, Any] = {}
    async with client.stream("POST", f"{url}/v1/completions", json=payload) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if any(choice.get("text") for choice in event.get("choices", [])):
                times.append(time.perf_counter())
    return usage


async def measure(url: str, model: str, sentences: int, salt: int, quiet_s: float) -> dict[str, Any]:
    """One run: streams, then the long prompt; the streams' gaps split into quiet and prefill windows."""
    async with httpx.AsyncClient(timeout=600) as client:
        records: list[list[float]] = [[] for _ in range(STREAMS)]
        runners = [
            asyncio.create_task(
                stream(
                    client,
                    url,
                    {
                        "model": model,
                        "prompt": f"Story {salt}-{i}: once upon a time",
                        "max_tokens": 1000,
                        "ignore_eos": True,
                    },
                    records[i],
                )
            )
            for i in range(STREAMS)
        ]
        await asyncio.sleep(quiet_s)
        long_times: list[float] = []
        sent = time.perf_counter()
        usage = await stream(client, url, {"model": model, "prompt": long_prompt(sentences, salt), "max_tokens": 1},
                             long_times)  # fmt: skip
        first = long_times[0]
        for task in runners:
            task.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
    quiet: list[float] = []
    prefill: list[float] = []
    during = 0
    for times in records:
        warm = times[0] + 0.5 if times else sent  # skip each stream's own start-up
        for a, b in itertools.pairwise(times):
            if warm <= a and b <= sent:
                quiet.append((b - a) * 1000)
            elif sent <= a and b <= first:
                prefill.append((b - a) * 1000)
        during += sum(1 for t in times if sent <= t <= first)
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "prefill_ms": (first - sent) * 1000,
        "quiet_p90_ms": percentile(quiet, 90),
        "prefill_p90_ms": percentile(prefill, 90),
        "stream_tokens_during_prefill": during / STREAMS,
    }


def bench(model: str, cap: int, sentences: int, repeats: int, out: Path) -> dict[str, Any]:
    """Median figures over ``repeats`` runs on one server started with ``--prefill-chunk cap`` (0: adaptive)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = microserve_cmd(port, "--model", model, "--parallel", "8", "--batch-size", "256")
    cmd += ["--prefill-chunk", str(cap)] if cap else []
    with running_server(model, cmd, url, f"{url}/v1/health/ready", log_path=out / f"long-prompt-{cap}.log"):
        asyncio.run(measure(url, model, 10, -1, 1.0))  # warm-up
        runs = [asyncio.run(measure(url, model, sentences, r, 2.0)) for r in range(repeats)]
    merged = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    merged["ratio"] = merged["prefill_p90_ms"] / merged["quiet_p90_ms"]
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument(
        "--caps", default="0,256", help="--prefill-chunk values to compare, 0 for adaptive (first is checked)"
    )
    parser.add_argument("--sentences", type=int, default=115, help="long prompt size (about 13 tokens each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    caps = [int(c) for c in args.caps.split(",")]
    rows = {cap: bench(args.model, cap, args.sentences, args.repeats, args.out) for cap in caps}
    print(f"{args.model}, {STREAMS} running streams, median of {args.repeats}")
    print("| prefill cap | long prompt tokens | prefill ms | stream tokens during prefill | "
          "ITL p90 quiet ms | ITL p90 during prefill ms | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for cap, r in rows.items():
        print(
            f"| {cap or 'adaptive'} | {r['prompt_tokens']:.0f} | {r['prefill_ms']:.0f} | "
            f"{r['stream_tokens_during_prefill']:.1f} | {r['quiet_p90_ms']:.1f} | {r['prefill_p90_ms']:.1f} | "
            f"{r['ratio']:.2f} |"
        )
    checked = rows[caps[0]]["ratio"]
    ok = checked < LIMIT
    verdict = "ok" if ok else "ABOVE"
    print(f"\n{caps[0] or 'adaptive'}: ITL p90 during prefill / quiet = {checked:.2f} (limit {LIMIT}): {verdict}")
    (args.out / "long_prompt_itl.json").write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
