"""Measured step costs of one microserve replica, the figures ``bench/router_sim.py`` builds its replicas from.

Against a real ``microserve serve`` (default model, ``--threads T``, 8 slots) it measures, over HTTP as a client
sees it:

- **prefill**: TTFT of streamed completions with ``max_tokens: 1`` for prompts of 32 to 1024 tokens, each with its
  own opening so that nothing is reused; a least-squares line gives the fixed cost per request (HTTP, template,
  tokenizing, the first sample) and the cost per prompt token when nothing else runs.
- **prefix reuse**: a 512-token prompt, then the same prompt with ~64 tokens more: ``cached_tokens`` and TTFT of
  the second, against what the line predicts for the uncached part alone.
- **decode**: ``b`` streams decoding side by side (b = 1, 2, 4, 8): the median gap between tokens is the time of a
  decode step of ``b`` sequences; a line gives its fixed and per-sequence parts.
- **prefill beside decoding streams**: while 4 streams decode, a long prompt arrives; the engine then caps the
  prompt tokens per step (its adaptive budget), and the streams' gaps during the prefill give the cost of a prompt
  token inside a decode step.

    flock /tmp/microserve-cpu.lock .venv/bin/python bench/step_costs.py --threads 1 --out bench/step_costs_t1.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chat_workload import WORDS
from loadgen import free_port, microserve_cmd, running_server


def prompt_of(words: int, nonce: str) -> str:
    """A prompt of about ``words`` tokens that no other prompt of the run shares beyond its first token."""
    rng = random.Random(nonce)
    return f"{nonce}: " + " ".join(rng.choice(WORDS) for _ in range(words))


async def stream(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed completion: TTFT, the time of every later token, and the usage."""
    payload = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    stamps: list[float] = []
    usage: dict[str, Any] = {}
    async with client.stream("POST", f"{url}/v1/completions", json=payload) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if any(c.get("text") for c in event.get("choices", [])):
                stamps.append(now)
    return {
        "start": start,
        "ttft": stamps[0] - start,
        "stamps": stamps,
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
    }


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


async def measure(url: str, model: str, repeats: int) -> dict[str, Any]:
    """Every figure the simulator needs, in seconds."""
    counter = 0

    def nonce() -> str:
        nonlocal counter
        counter += 1
        return f"Run {counter} {random.random():.6f}"

    async with httpx.AsyncClient(timeout=300) as client:
        await stream(client, url, model, prompt_of(16, nonce()), 4)  # warm-up
        prefill = []
        for words in (32, 128, 256, 512, 1024):
            for _ in range(repeats):
                r = await stream(client, url, model, prompt_of(words, nonce()), 1)
                prefill.append((r["prompt_tokens"] - r["cached_tokens"], r["ttft"]))
        fixed_s, prefill_token_s = fit([float(n) for n, _ in prefill], [t for _, t in prefill])

        reuse = []
        for _ in range(repeats):
            base = prompt_of(512, nonce())
            await stream(client, url, model, base, 1)
            r = await stream(client, url, model, base + " " + prompt_of(64, "more")[6:], 1)
            new = r["prompt_tokens"] - r["cached_tokens"]
            reuse.append(
                {
                    "prompt_tokens": r["prompt_tokens"],
                    "cached_tokens": r["cached_tokens"],
                    "ttft_s": r["ttft"],
                    "predicted_s": fixed_s + prefill_token_s * new,
                    "cold_predicted_s": fixed_s + prefill_token_s * r["prompt_tokens"],
                }
            )

        decode = {}
        for b in (1, 2, 4, 8):
            gaps: list[float] = []
            for _ in range(repeats):
                runs = await asyncio.gather(*(stream(client, url, model, prompt_of(16, nonce()), 64) for _ in range(b)))
                # Gaps after every stream has started: then each step carries b decode tokens.
                settled = max(r["stamps"][0] for r in runs)
                for r in runs:
                    s = [t for t in r["stamps"] if t > settled]
                    gaps += [b2 - a for a, b2 in itertools.pairwise(s)]
            decode[b] = statistics.median(gaps)
        decode_fixed_s, decode_seq_s = fit([float(b) for b in decode], list(decode.values()))

        mixed = []
        for _ in range(repeats):
            streams = [asyncio.create_task(stream(client, url, model, prompt_of(16, nonce()), 160)) for _ in range(4)]
            await asyncio.sleep(1.0)
            long = await stream(client, url, model, prompt_of(768, nonce()), 1)
            runs = await asyncio.gather(*streams)
            begin, end = long["start"], long["start"] + long["ttft"]
            during = [b2 - a for r in runs for a, b2 in itertools.pairwise(r["stamps"]) if begin < a and b2 < end]
            step_s = statistics.median(during)
            prefill_s = max(long["ttft"] - fixed_s, 1e-3)
            chunk = long["prompt_tokens"] * step_s / prefill_s  # prompt tokens carried by each step
            mixed.append(
                {
                    "prompt_tokens": long["prompt_tokens"],
                    "ttft_s": long["ttft"],
                    "step_s": step_s,
                    "chunk_tokens": chunk,
                    "token_s": max(step_s - decode[4], 0.0) / chunk,
                }
            )
    return {
        "fixed_s": fixed_s,
        "prefill_token_s": prefill_token_s,
        "prefill_points": prefill,
        "reuse": reuse,
        "decode_step_s": {str(b): v for b, v in decode.items()},
        "decode_fixed_s": decode_fixed_s,
        "decode_seq_s": decode_seq_s,
        "mixed": mixed,
        "mixed_token_s": statistics.median(m["token_s"] for m in mixed),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "step_costs.json")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = microserve_cmd(port, "--model", args.model, "--threads", str(args.threads), "--parallel", str(args.parallel))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with running_server(args.model, cmd, url, f"{url}/v1/health/ready", log_path=args.out.with_suffix(".log")):
        costs = await_measure(url, args.model, args.repeats)
    costs.update(
        {
            "model": args.model,
            "threads": args.threads,
            "slots": args.parallel,
            "batch_size": 256,
            "measured": time.ctime(),
        }
    )
    args.out.write_text(json.dumps(costs, indent=1))
    print(f"{args.model}, --threads {args.threads}, --parallel {args.parallel}, {args.repeats} repeats")
    print(f"fixed cost per request      {costs['fixed_s'] * 1e3:7.1f} ms")
    print(f"prefill per prompt token    {costs['prefill_token_s'] * 1e3:7.3f} ms (nothing else running)")
    print(f"prompt token in a decode step {costs['mixed_token_s'] * 1e3:5.3f} ms")
    for b, v in costs["decode_step_s"].items():
        print(f"decode step, {b:>2} sequences   {v * 1e3:7.1f} ms")
    print(
        f"decode step fit             {costs['decode_fixed_s'] * 1e3:.1f} ms + {costs['decode_seq_s'] * 1e3:.2f} ms/seq"
    )
    for r in costs["reuse"]:
        print(
            f"reuse: {r['cached_tokens']}/{r['prompt_tokens']} cached, TTFT {r['ttft_s'] * 1e3:.0f} ms "
            f"(uncached part alone predicts {r['predicted_s'] * 1e3:.0f}, cold {r['cold_predicted_s'] * 1e3:.0f})"
        )
    print(f"written to {args.out}")
    return 0


def await_measure(url: str, model: str, repeats: int) -> dict[str, Any]:
    """``measure`` run to completion on a fresh event loop."""
    return asyncio.run(measure(url, model, repeats))


if __name__ == "__main__":
    raise SystemExit(main())
