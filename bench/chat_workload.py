"""A multi-turn chat workload, the same for the router simulator and for a real run against a server.

Closed-loop users: each user holds one conversation at a time; every turn resends the whole history (the system
prompt, each earlier question and reply) plus a new question, waits for the streamed reply, thinks, and asks the
next; after the last turn of a conversation the user starts a new one. Everything a user sends is drawn from a
random generator seeded by ``(seed, user)``, so a workload is fixed by its :class:`WorkloadSpec` alone: the
simulator (``bench/router_sim.py``) and a live replay (:func:`replay`) walk the same conversations in the same order.
Replies are ``max_tokens`` long exactly (``ignore_eos``), so that the simulated and real prompts grow alike.

    .venv/bin/python bench/chat_workload.py --url http://127.0.0.1:8000 --users 8 --duration 120 --out run.json

replays the workload against a running server (one replica, or a Ray Serve application) and writes each request's
TTFT, prompt and cached tokens; ``router_sim.py --compare run.json`` sets the simulator's prediction beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Ordinary English words: most are one token in the SmolLM2 and Gemma vocabularies, so a question's token count
# is about its word count plus punctuation.
WORDS = (
    "the of and to in is was that for on with as by at from his an were are which this be or had not but have "
    "one they you all their been has more when who will there would can other into time some what so these two "
    "first may then any like do than only its over also new after most made about such through where many before "
    "must well back years much way down should because each just those people how too little state good very make "
    "world still own see men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three place lamp light tower "
    "keeper ship coast rock storm night sea wave harbour signal lens beam fog bell island shore sailor voyage "
    "chart wind tide stone stair glass oil wick flame winter summer station supply boat rope anchor"
).split()

SYSTEM_OPENERS = (
    "You are a helpful assistant who answers questions about lighthouses and the sea in detail.",
    "You are a patient tutor. Explain each step clearly and check the reader can follow.",
    "You are a travel guide for coastal towns; answer with practical advice for visitors.",
    "You are an engineer who explains how old machines worked, plainly and accurately.",
    "You are a historian of shipping; give dates where you know them and say when you do not.",
    "You are a careful editor. Keep answers short, precise and free of filler words.",
    "You are a friendly science teacher for curious adults; use everyday comparisons.",
    "You are a museum docent describing objects in a maritime collection to visitors.",
)


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """Everything that fixes a workload. Lengths are in words (questions) and tokens (replies)."""

    seed: int = 0
    system_prompts: int = 8  # distinct system prompts; conversations share them
    system_words: tuple[int, int] = (40, 80)
    turns: tuple[int, int] = (4, 8)  # turns per conversation, inclusive
    question_words: tuple[int, int] = (20, 50)
    reply_tokens: tuple[int, int] = (32, 64)
    think_s: float = 3.0  # mean pause between a reply and the next question (exponential, capped at 4x)
    start_spread_s: float = 10.0  # users start uniformly over this span

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkloadSpec:
        """The spec a ``to_dict`` wrote."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields})


@dataclass(frozen=True, slots=True)
class Turn:
    """One question; the reply is ``max_tokens`` long; ``think_s`` is the pause before the question is sent."""

    question: str
    max_tokens: int
    think_s: float


@dataclass(frozen=True, slots=True)
class Conversation:
    """A system prompt and its turns; ``system_id`` says which of the spec's system prompts it is."""

    user: int
    index: int  # the user's n-th conversation
    system_id: int
    system: str
    turns: tuple[Turn, ...]


@dataclass
class Workload:
    """The users and conversations a spec defines."""

    spec: WorkloadSpec
    _systems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = random.Random(f"{self.spec.seed}:systems")
        self._systems = [
            f"{SYSTEM_OPENERS[i % len(SYSTEM_OPENERS)]} Context {i}: {_words(rng, self.spec.system_words)}."
            for i in range(self.spec.system_prompts)
        ]

    def start_s(self, user: int) -> float:
        """When ``user`` sends its first question, seconds after the run starts."""
        return random.Random(f"{self.spec.seed}:start:{user}").uniform(0.0, self.spec.start_spread_s)

    def conversations(self, user: int) -> Iterator[Conversation]:
        """``user``'s conversations, one after another, without end."""
        spec = self.spec
        rng = random.Random(f"{spec.seed}:user:{user}")
        for index in range(sys.maxsize):
            system_id = rng.randrange(spec.system_prompts)
            n_turns = rng.randint(*spec.turns)
            turns = tuple(
                Turn(
                    question=f"Question {index}.{t} from user {user}: {_words(rng, spec.question_words)}?",
                    max_tokens=rng.randint(*spec.reply_tokens),
                    # The first question of a conversation follows the last reply of the previous one after a pause.
                    think_s=min(rng.expovariate(1.0 / spec.think_s), 4 * spec.think_s) if spec.think_s > 0 else 0.0,
                )
                for t in range(n_turns)
            )
            yield Conversation(user, index, system_id, self._systems[system_id], turns)


def _words(rng: random.Random, bounds: tuple[int, int]) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*bounds)))


def messages_for(conversation: Conversation, turn: int, replies: list[str]) -> list[dict[str, str]]:
    """The chat messages of ``turn`` (0-based): the system prompt, earlier questions and ``replies``, the question."""
    messages = [{"role": "system", "content": conversation.system}]
    for t in range(turn):
        messages.append({"role": "user", "content": conversation.turns[t].question})
        messages.append({"role": "assistant", "content": replies[t]})
    messages.append({"role": "user", "content": conversation.turns[turn].question})
    return messages


# -- a live replay ------------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One streamed turn as the client saw it (times in seconds since the run started)."""

    user: int
    conversation: int
    turn: int
    sent: float
    ttft: float | None = None
    done: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


async def _turn(client: Any, url: str, model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    payload = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {response.status_code}: {body[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {json.dumps(event['error'])[:200]}")
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    parts.append(content)
    return {"ttft": ttft, "reply": "".join(parts), "usage": usage}


async def replay(url: str, model: str, workload: Workload, users: int, duration_s: float) -> list[RequestRecord]:
    """Run ``users`` closed-loop users for ``duration_s`` seconds; no question is sent after that."""
    import httpx

    records: list[RequestRecord] = []
    t0 = time.perf_counter()

    async def user(u: int, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(workload.start_s(u))
        for conversation in workload.conversations(u):
            replies: list[str] = []
            for t, turn in enumerate(conversation.turns):
                if t > 0 or conversation.index > 0:
                    await asyncio.sleep(turn.think_s)
                now = time.perf_counter() - t0
                if now >= duration_s:
                    return
                record = RequestRecord(u, conversation.index, t, sent=now)
                records.append(record)
                try:
                    result = await _turn(client, url, model, messages_for(conversation, t, replies), turn.max_tokens)
                except Exception as exc:
                    record.error = f"{type(exc).__name__}: {exc}"
                    record.done = time.perf_counter() - t0
                    break  # the conversation is lost; the user starts the next one
                record.done = time.perf_counter() - t0
                record.ttft = result["ttft"]
                usage = result["usage"]
                record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                record.completion_tokens = int(usage.get("completion_tokens") or 0)
                record.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                replies.append(result["reply"])

    limits = httpx.Limits(max_connections=users + 4, max_keepalive_connections=users + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=30.0), limits=limits) as client:
        await asyncio.gather(*(user(u, client) for u in range(users)))
    return records


def summarize(records: list[RequestRecord], warmup_s: float, duration_s: float) -> dict[str, Any]:
    """TTFT percentiles (ms) of requests sent in [warmup, duration), completion tokens/s finished in that window."""
    window = [r for r in records if warmup_s <= r.sent < duration_s]
    ok = [r for r in window if r.error is None and r.ttft is not None]
    ttfts = sorted(r.ttft * 1000 for r in ok if r.ttft is not None)
    done = [r for r in records if r.error is None and r.done is not None and warmup_s <= r.done < duration_s]
    span = duration_s - warmup_s
    turns_after_first = [r for r in ok if r.turn > 0]
    return {
        "requests": len(window),
        "errors": len(window) - len(ok),
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p90_ms": percentile(ttfts, 90),
        "tok_s": sum(r.completion_tokens for r in done) / span if span > 0 else math.nan,
        "cached_fraction": (
            sum(r.cached_tokens for r in ok) / max(1, sum(r.prompt_tokens for r in ok)) if ok else math.nan
        ),
        "later_turns_with_cache": (
            sum(1 for r in turns_after_first if r.cached_tokens > 0) / len(turns_after_first)
            if turns_after_first
            else math.nan
        ),
    }


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="Base URL of the server (no /v1).")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--duration", type=float, default=120.0, help="Seconds during which questions are sent.")
    parser.add_argument("--warmup", type=float, default=20.0, help="Seconds left out of the summary.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--think", type=float, default=WorkloadSpec().think_s)
    parser.add_argument("--out", type=Path, help="Write the spec, the records and the summary as JSON.")
    args = parser.parse_args()
    spec = WorkloadSpec(seed=args.seed, think_s=args.think)
    records = asyncio.run(replay(args.url, args.model, Workload(spec), args.users, args.duration))
    summary = summarize(records, args.warmup, args.duration)
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "spec": spec.to_dict(),
                    "users": args.users,
                    "duration_s": args.duration,
                    "warmup_s": args.warmup,
                    "summary": summary,
                    "records": [dataclasses.asdict(r) for r in records],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
