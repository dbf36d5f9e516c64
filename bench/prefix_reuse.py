"""Multi-turn chat: time to first token with prefix reuse against the same server without it.

An 8-turn conversation in which every turn resends the whole history (as chat clients do) runs against
``microserve serve`` twice, once with the prefix cache (default) and once with ``--no-prefix-cache``. Each turn
is streamed, greedy, and its TTFT and ``usage.prompt_tokens_details.cached_tokens`` are recorded. The limit
checked: by turn 8, TTFT with reuse is at most half of TTFT without it.

    .venv/bin/python bench/prefix_reuse.py [--model smollm2-135m-instruct] [--turns 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from loadgen import free_port, microserve_cmd, running_server

SYSTEM = "You are a helpful assistant who answers questions about lighthouses in detail."
QUESTIONS = [
    "How did lighthouse keepers keep the lamp burning through long winter nights before electricity?",
    "What is a Fresnel lens, and why did it replace the older reflector systems in most lighthouses?",
    "Why do different lighthouses flash in different patterns, and how do sailors read those patterns?",
    "How were lighthouses built on bare rocks far out at sea, where waves break over the foundations?",
    "What dangers did keepers and their families face when they lived at remote lighthouse stations?",
    "How did fog signals work at lighthouses, and why were they needed in addition to the light?",
    "When and why were most lighthouses automated, and what happened to the keepers afterwards?",
    "Which famous lighthouses are still working today, and how are they maintained by their owners?",
    "How do modern satellite navigation systems compare with lighthouses for keeping ships safe?",
    "If you could visit one lighthouse, which would you choose and what would you want to see there?",
]


def turn(client: httpx.Client, url: str, model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """Stream one chat turn; return TTFT (ms), the reply and the usage."""
    payload = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                content = choice["delta"].get("content")
                if content:
                    ttft = ttft if ttft is not None else (time.perf_counter() - start) * 1000
                    parts.append(content)
    return {"ttft_ms": ttft, "reply": "".join(parts), "usage": usage}


def conversation(url: str, model: str, system: str, turns: int, max_tokens: int) -> list[dict[str, Any]]:
    """One conversation of ``turns`` turns; the history grows by each question and reply."""
    messages = [{"role": "system", "content": system}]
    rows = []
    with httpx.Client(timeout=300) as client:
        for i in range(turns):
            messages.append({"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]})
            result = turn(client, url, model, messages, max_tokens)
            messages.append({"role": "assistant", "content": result["reply"]})
            rows.append(
                {
                    "turn": i + 1,
                    "ttft_ms": result["ttft_ms"],
                    "prompt_tokens": result["usage"].get("prompt_tokens"),
                    "cached_tokens": (result["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                }
            )
    return rows


def bench(model: str, reuse: bool, turns: int, max_tokens: int, repeats: int, out: Path) -> list[dict[str, Any]]:
    """Median per-turn figures over ``repeats`` conversations on a fresh server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    flag = "--prefix-cache" if reuse else "--no-prefix-cache"
    cmd = microserve_cmd(port, "--model", model, "--parallel", "4", flag)
    runs = []
    with running_server(model, cmd, url, f"{url}/v1/health/ready", log_path=out / f"prefix-{flag[2:]}.log"):
        conversation(url, model, "Warm-up.", 1, 4)
        for r in range(repeats):
            # Each conversation opens with its own line, so no run reuses another run's history.
            runs.append(conversation(url, model, f"Conversation {r}. {SYSTEM}", turns, max_tokens))
    merged = []
    for i in range(turns):
        row = dict(runs[0][i])
        row["ttft_ms"] = statistics.median(run[i]["ttft_ms"] for run in runs)
        row["cached_tokens"] = min(run[i]["cached_tokens"] for run in runs)
        merged.append(row)
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    with_reuse = bench(args.model, True, args.turns, args.max_tokens, args.repeats, args.out)
    without = bench(args.model, False, args.turns, args.max_tokens, args.repeats, args.out)
    print(f"{args.model}, {args.turns} turns, {args.max_tokens} tokens a reply, median of {args.repeats}")
    print("| turn | prompt tokens | cached tokens | TTFT reuse ms | TTFT cold ms | reuse / cold |")
    print("|---|---|---|---|---|---|")
    for a, b in zip(with_reuse, without, strict=True):
        print(
            f"| {a['turn']} | {a['prompt_tokens']} | {a['cached_tokens']} | {a['ttft_ms']:.0f} | "
            f"{b['ttft_ms']:.0f} | {a['ttft_ms'] / b['ttft_ms']:.2f} |"
        )
    ratio = with_reuse[-1]["ttft_ms"] / without[-1]["ttft_ms"]
    ok = ratio <= 0.5 and with_reuse[-1]["cached_tokens"] > 0
    print(f"\nturn {args.turns}: TTFT reuse / cold = {ratio:.2f} (limit 0.50): {'ok' if ok else 'ABOVE'}")
    (args.out / "prefix_reuse.json").write_text(json.dumps({"reuse": with_reuse, "cold": without}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
