"""Routing for scale past this machine: a discrete-event simulation of N microserve replicas behind a router.

Each simulated replica is microserve's llama.cpp scheduler in miniature: ``slots`` sequence slots that keep their
KV after a request ends; a new request takes the free slot sharing the longest prefix with its prompt (else the
least recently used one) and skips that prefix's prefill; every step carries one token of each decoding sequence
plus a chunk of pending prompt, capped while sequences decode by the same adaptive budget the engine uses (a
mixed step costs at most about twice a decode step). Step times come from measurements of a real replica
(``bench/step_costs.py``): a fixed cost per request, prefill per token, a decode step as a function of its batch,
and a prompt token's cost inside a decode step.

The workload is ``bench/chat_workload.py``'s multi-turn chat (closed-loop users, each turn resending the whole
history, think times), with ``--users-per-replica`` users per replica, for N = 1, 2, 4, 8, 16, 64. Three routers
pick the replica of each request: prefix-aware (``microserve.scale.policy.PrefixAwarePolicy``, the Ray router's
policy), least-loaded and round-robin. The table gives TTFT p50/p90, completion tokens/s, its ratio to N times the
single replica's, and the share of prompt tokens served from the prefix cache.

    flock /tmp/microserve-cpu.lock .venv/bin/python bench/router_sim.py --costs bench/step_costs_t1.json

Limits checked: prefix-aware TTFT p50 at most half of round-robin's for N >= 8, and prefix-aware throughput at
least 0.9 x N x the single replica's. ``--compare run.json`` (written by ``chat_workload.py --out``) simulates the
run's workload on ``--replicas`` replicas and prints the prediction beside the measurement.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from chat_workload import Conversation, Workload, WorkloadSpec, percentile
from microserve.scale.policy import (
    DEFAULT_IMBALANCE_THRESHOLD,
    PLACEMENTS,
    LeastLoadedPolicy,
    PrefixAwarePolicy,
    RoundRobinPolicy,
    RoutingPolicy,
)
from microserve.scale.prefix import PrefixKey, key_from_tokens

REPO = Path(__file__).resolve().parent.parent
REPLICA_COUNTS = (1, 2, 4, 8, 16, 64)

# Segments of a prompt: (id, tokens). Equal ids mean equal tokens, so prefixes compare segment by segment.
Segment = tuple[int, int]

# Chat-template tokens around each message (SmolLM2's ``<|im_start|>role\n ... <|im_end|>\n``) and a word's tokens.
MESSAGE_OVERHEAD = 5
TOKENS_PER_WORD = 1.15


def _text_tokens(text: str) -> int:
    return max(1, round(len(text.split()) * TOKENS_PER_WORD))


# -- step costs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCosts:
    """A replica's costs in seconds, from ``bench/step_costs.py``."""

    request_s: float  # per request outside the engine steps: HTTP, template, tokenizer, streaming
    step_s: float  # the fixed part of any step
    prefill_token_s: float  # a prompt token in a step without decoding sequences
    decode_seq_s: float  # each decoding sequence in a step
    mixed_token_s: float  # a prompt token in a step that also decodes
    slots: int = 8
    batch_size: int = 256

    @classmethod
    def load(cls, path: Path, slots: int | None = None, scale: float = 1.0) -> StepCosts:
        """Costs from a ``step_costs.py`` JSON file, each multiplied by ``scale`` (a slower or faster machine)."""
        data = json.loads(path.read_text())
        step = max(data["decode_fixed_s"], 1e-4)
        return cls(
            # The TTFT line's intercept holds one step's fixed cost: the rest is the request's own.
            request_s=max(data["fixed_s"] - step - data["decode_seq_s"], 0.0) * scale,
            step_s=step * scale,
            prefill_token_s=data["prefill_token_s"] * scale,
            decode_seq_s=data["decode_seq_s"] * scale,
            mixed_token_s=data["mixed_token_s"] * scale,
            slots=slots or data.get("slots", 8),
            batch_size=data.get("batch_size", 256),
        )

    def step(self, decoding: int, prompt: int) -> float:
        """Seconds of a step with ``decoding`` sequences and ``prompt`` prompt tokens."""
        if decoding == 0:
            return self.step_s + self.prefill_token_s * prompt
        return self.step_s + self.decode_seq_s * decoding + self.mixed_token_s * prompt

    def chunk(self, decoding: int) -> int:
        """Prompt tokens a step may carry beside ``decoding`` sequences (the engine's budget with factor 2)."""
        decode_s = self.step_s + self.decode_seq_s * decoding
        return max(8, min(self.batch_size, int(decode_s / self.mixed_token_s)))


# -- the replica --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SimRequest:
    """One turn on its way through a replica."""

    arrival: float
    segments: list[Segment]
    prompt_tokens: int
    max_tokens: int
    reply: Segment
    on_first: Callable[[float], None]
    on_done: Callable[[float, int], None]
    prefilled: int = 0
    generated: int = 0
    cached: int = 0
    slot: SimSlot | None = None


@dataclass(eq=False)
class SimSlot:
    """A sequence slot and the tokens its KV cells hold, as segments."""

    segments: list[Segment] = field(default_factory=list)
    last_used: int = 0
    busy: bool = False


def common_prefix(a: list[Segment], b: list[Segment]) -> int:
    """Tokens two segment lists share from the start."""
    n = 0
    for (ida, la), (idb, lb) in zip(a, b, strict=False):
        if ida != idb:
            break
        n += min(la, lb)
        if la != lb:
            break
    return n


class SimReplica:
    """microserve's scheduler, step by step, on simulated time."""

    def __init__(self, name: str, costs: StepCosts, sim: Simulation) -> None:
        self.name = name
        self.costs = costs
        self.sim = sim
        self.slots = [SimSlot() for _ in range(costs.slots)]
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.stepping = False
        self.clock = itertools.count(1)
        self.busy_s = 0.0

    @property
    def queue(self) -> int:
        """Requests in flight here, as a router sees them (running and waiting)."""
        return len(self.running) + len(self.waiting)

    def submit(self, request: SimRequest, now: float) -> None:
        """A request arrives (after its fixed cost, which the router's HTTP hop and the template take)."""
        self.waiting.append(request)
        if not self.stepping:
            self._step(now)

    def _admit(self) -> None:
        while self.waiting:
            free = [s for s in self.slots if not s.busy]
            if not free:
                return
            request = self.waiting.popleft()
            best, best_len = free[0], -1
            for slot in free:
                n = common_prefix(slot.segments, request.segments)
                if n > best_len or (n == best_len and slot.last_used < best.last_used):
                    best, best_len = slot, n
            reuse = min(best_len, request.prompt_tokens - 1)
            best.busy = True
            best.last_used = next(self.clock)
            request.slot = best
            request.prefilled = request.cached = reuse
            self.running.append(request)

    def _step(self, now: float) -> None:
        self._admit()
        if not self.running:
            self.stepping = False
            return
        self.stepping = True
        decoding = [r for r in self.running if r.prefilled == r.prompt_tokens]
        limit = self.costs.batch_size if not decoding else min(self.costs.batch_size, self.costs.chunk(len(decoding)))
        prompt = 0
        finishing_prefill = []
        for r in self.running:
            if r.prefilled == r.prompt_tokens:
                continue
            take = min(limit - prompt, r.prompt_tokens - r.prefilled)
            if take <= 0:
                break
            r.prefilled += take
            prompt += take
            if r.prefilled == r.prompt_tokens:
                finishing_prefill.append(r)
        seconds = self.costs.step(len(decoding), prompt)
        self.busy_s += seconds
        self.sim.at(now + seconds, lambda t: self._finish_step(t, decoding, finishing_prefill))

    def _finish_step(self, now: float, decoding: list[SimRequest], first: list[SimRequest]) -> None:
        for r in first:
            r.generated = 1
            r.on_first(now)
        for r in decoding:
            r.generated += 1
        for r in [*first, *decoding]:
            if r.generated >= r.max_tokens:
                self.running.remove(r)
                slot = r.slot
                assert slot is not None
                # The KV holds the prompt and every sampled token but the last (never fed back).
                slot.segments = [*r.segments, (r.reply[0], r.generated - 1)]
                slot.busy = False
                slot.last_used = next(self.clock)
                r.on_done(now, r.generated)
        self._step(now)


# -- the simulation -----------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One simulated turn (times in simulated seconds)."""

    user: int
    turn: int
    sent: float
    replica: str = ""
    ttft: float | None = None
    done: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


class KeyCache:
    """Prefix keys by (user, conversation, turn): the same turn has the same key whatever the router or N."""

    def __init__(self) -> None:
        self._keys: dict[tuple[int, int, int], PrefixKey] = {}

    def get(self, where: tuple[int, int, int], segments: list[Segment], model: str) -> PrefixKey:
        key = self._keys.get(where)
        if key is None:
            tokens = [(sid << 16) + i for sid, n in segments for i in range(n)]
            key = self._keys[where] = key_from_tokens(model, tokens)
        return key


def _segment_ids(user: int, conversation: int, turn: int) -> tuple[int, int, int, int]:
    """The question's, assistant header's, reply's and end-of-reply's segment ids of one turn (positive, below
    2**47 so that ``(id << 16) + i`` fits a 64-bit token)."""
    base = ((user * 65_536 + conversation) * 256 + turn) * 4 + 1
    return base, base + 1, base + 2, base + 3


class SimClock:
    """Simulated time, for a policy that asks the time (how long a conversation has been quiet)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Simulation:
    """N replicas, a routing policy and the closed-loop users of a workload, on one event queue."""

    def __init__(
        self,
        replicas: int,
        policy: RoutingPolicy,
        costs: StepCosts,
        workload: Workload,
        users: int,
        duration_s: float,
        *,
        extra_overhead_s: float = 0.0,
        keys: KeyCache | None = None,
        model: str = "smollm2-135m-instruct",
        first_user: int = 0,
        clock: SimClock | None = None,
    ) -> None:
        self.clock = clock or SimClock()
        self.replicas = {f"r{i}": SimReplica(f"r{i}", costs, self) for i in range(replicas)}
        self.policy = policy
        self.costs = costs
        self.workload = workload
        self.users = range(first_user, first_user + users)
        self.duration_s = duration_s
        self.overhead_s = costs.request_s + extra_overhead_s
        self.keys = keys or KeyCache()
        self.model = model
        self.records: list[Record] = []
        self._events: list[tuple[float, int, Callable[[float], None]]] = []
        self._order = itertools.count()

    def at(self, when: float, action: Callable[[float], None]) -> None:
        """Run ``action(when)`` at simulated time ``when``."""
        heapq.heappush(self._events, (when, next(self._order), action))

    def run(self) -> list[Record]:
        """Simulate until no question is left to send and every reply has finished."""
        for u in self.users:
            conversations = self.workload.conversations(u)
            self.at(self.workload.start_s(u), lambda t, u=u, c=conversations: self._start(t, u, c))
        while self._events:
            when, _, action = heapq.heappop(self._events)
            self.clock.now = when
            action(when)
        return self.records

    def _start(self, now: float, user: int, conversations: Any) -> None:
        self._open(now, user, conversations, first=True)

    def _open(self, now: float, user: int, conversations: Any, *, first: bool = False) -> None:
        conversation: Conversation = next(conversations)
        # Every conversation with this system prompt shares its tokens: one segment id per system prompt.
        system = (-(conversation.system_id + 1), _text_tokens(conversation.system) + MESSAGE_OVERHEAD)
        pause = 0.0 if first else conversation.turns[0].think_s
        self.at(now + pause, lambda w: self._turn(w, user, conversations, conversation, 0, [system]))

    def _turn(
        self, now: float, user: int, conversations: Any, conversation: Conversation, t: int, history: list[Segment]
    ) -> None:
        if now >= self.duration_s:
            return
        turn = conversation.turns[t]
        # Segment ids are fixed by (user, conversation, turn): the keys that ``self.keys`` shares between runs must
        # chain from one turn to the next whichever run computed them (a counter would break the chain).
        ids = _segment_ids(user, conversation.index, t)
        question = (ids[0], _text_tokens(turn.question) + MESSAGE_OVERHEAD)
        # The assistant header that opens the reply: the same tokens each time, but after a different question, so
        # never part of a prefix another prompt shares.
        segments = [*history, question, (ids[1], 3)]
        prompt_tokens = sum(n for _, n in segments)
        reply = (ids[2], turn.max_tokens)
        record = Record(user, t, sent=now, prompt_tokens=prompt_tokens)
        self.records.append(record)
        key = self.keys.get((user, conversation.index, t), segments, self.model)
        queues = {name: r.queue for name, r in self.replicas.items()}
        decision = self.policy.choose(key, queues)
        self.policy.routed(decision.replica, key)
        record.replica = decision.replica
        replica = self.replicas[decision.replica]

        def first(when: float) -> None:
            record.ttft = when - now + self.overhead_s

        def done(when: float, tokens: int) -> None:
            record.done = when + self.overhead_s
            record.completion_tokens = tokens
            record.cached_tokens = request.cached
            # The next prompt resends the reply as text plus the template's end-of-message tokens.
            next_history = [*history, question, segments[-1], reply, (ids[3], 2)]
            after = when + self.overhead_s
            if t + 1 < len(conversation.turns):
                pause = conversation.turns[t + 1].think_s
                self.at(after + pause, lambda w: self._turn(w, user, conversations, conversation, t + 1, next_history))
            else:
                self._open(after, user, conversations)

        request = SimRequest(now, segments, prompt_tokens, turn.max_tokens, reply, first, done)
        # The request reaches the engine after its share of the fixed cost; its first token leaves after the rest.
        self.at(now, lambda w: replica.submit(request, w))


def summarize(records: list[Record], warmup_s: float, duration_s: float, runs: int = 1) -> dict[str, Any]:
    """The same figures as ``chat_workload.summarize`` for a real run (``runs``: records pooled from this many
    independent runs, whose throughput is averaged)."""
    window = [r for r in records if warmup_s <= r.sent < duration_s and r.ttft is not None]
    ttfts = sorted((r.ttft or 0.0) * 1000 for r in window)
    done = [r for r in records if r.done is not None and warmup_s <= r.done < duration_s]
    later = [r for r in window if r.turn > 0]
    return {
        "requests": len(window),
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p90_ms": percentile(ttfts, 90),
        "tok_s": sum(r.completion_tokens for r in done) / (duration_s - warmup_s) / runs,
        "cached_fraction": sum(r.cached_tokens for r in window) / max(1, sum(r.prompt_tokens for r in window)),
        "later_turns_with_cache": sum(1 for r in later if r.cached_tokens > 0) / len(later) if later else math.nan,
    }


POLICIES: dict[str, Callable[[int, argparse.Namespace, SimClock], RoutingPolicy]] = {
    "prefix-aware": lambda seed, a, clock: PrefixAwarePolicy(
        rng=random.Random(seed),
        imbalance_threshold=a.imbalance_threshold,
        capacity_blocks=a.capacity_blocks,
        shared_threshold=a.shared_threshold,
        placement=a.placement,
        idle_s=a.idle_s,
        slots=a.replica_slots,
        clock=clock,
    ),
    "least-loaded": lambda seed, a, clock: LeastLoadedPolicy(rng=random.Random(seed)),
    "round-robin": lambda seed, a, clock: RoundRobinPolicy(),
}


def simulate(
    n: int, name: str, args: argparse.Namespace, costs: StepCosts, keys: KeyCache
) -> tuple[dict[str, Any], Counter[str], float]:
    """One configuration: the summary, the policy's decision counts and the replicas' mean busy fraction.

    A single replica serves only a few users, so its figures depend on which users they are: N = 1 is the mean of
    ``--single-groups`` runs, each with its own users, the baseline the other rows' throughput is compared with.
    """
    groups = args.single_groups if n == 1 else 1
    users = round(n * args.users_per_replica)
    records: list[Record] = []
    counts: Counter[str] = Counter()
    busy = 0.0
    for group in range(groups):
        clock = SimClock()
        policy = POLICIES[name](args.seed, args, clock)
        sim = Simulation(
            n,
            policy,
            costs,
            Workload(WorkloadSpec(seed=args.seed, think_s=args.think, system_prompts=args.system_prompts)),
            users=users,
            duration_s=args.duration,
            extra_overhead_s=args.extra_overhead_ms / 1000,
            keys=keys,
            first_user=group * users,
            clock=clock,
        )
        mine = sim.run()
        records += mine
        if args.per_replica and n > 1:
            _print_per_replica(name, sim, mine, args)
        counts.update(policy.counts)
        busy += sum(r.busy_s for r in sim.replicas.values()) / (n * max(r.done or 0 for r in mine)) / groups
    return summarize(records, args.warmup, args.duration, runs=groups), counts, busy


def _print_per_replica(name: str, sim: Simulation, records: list[Record], args: argparse.Namespace) -> None:
    # Where the load went: conversations begun, turns, cached prompt share and busy time per replica.
    end = max(r.done or 0 for r in records)
    window = [r for r in records if args.warmup <= r.sent < args.duration and r.ttft is not None]
    parts = []
    for rname, replica in sim.replicas.items():
        mine = [r for r in window if r.replica == rname]
        begun = sum(1 for r in mine if r.turn == 0)
        cached = sum(r.cached_tokens for r in mine) / max(1, sum(r.prompt_tokens for r in mine))
        parts.append(f"{rname}: {begun} new/{len(mine)} turns, cached {cached:.2f}, busy {replica.busy_s / end:.2f}")
    print(f"  {name}: " + "; ".join(parts), file=sys.stderr)


def table(args: argparse.Namespace, costs: StepCosts) -> list[dict[str, Any]]:
    """Every policy at every N, printed as a markdown table."""
    keys = KeyCache()
    rows: list[dict[str, Any]] = []
    single: float | None = None
    print(
        f"{args.users_per_replica} users per replica, think {args.think:g} s, {args.duration:g} s simulated "
        f"({args.warmup:g} s warm-up left out), {costs.slots} slots; imbalance threshold {args.imbalance_threshold}, "
        f"new conversations by {args.placement}"
    )
    print(
        "| N | router | TTFT p50 ms | TTFT p90 ms | tok/s | / (N x single) | cached prompt share | busy | decisions |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.replicas:
        for name in POLICIES:
            started = time.perf_counter()
            summary, counts, busy = simulate(n, name, args, costs, keys)
            if n == 1 and name == "prefix-aware":
                single = summary["tok_s"]
            scale = summary["tok_s"] / (n * single) if single else math.nan
            decided = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if name == "prefix-aware")
            row = {"n": n, "router": name, **summary, "scaling": scale, "busy": busy, "decisions": dict(counts)}
            rows.append(row)
            print(
                f"| {n} | {name} | {summary['ttft_p50_ms']:.0f} | {summary['ttft_p90_ms']:.0f} | "
                f"{summary['tok_s']:.1f} | {scale:.2f} | {summary['cached_fraction']:.2f} | {busy:.2f} | {decided} |",
                flush=True,
            )
            if args.verbose:
                print(f"  ({time.perf_counter() - started:.1f} s wall)", file=sys.stderr)
    return rows


def check(rows: list[dict[str, Any]]) -> bool:
    """The limits: prefix-aware TTFT p50 <= 0.5 x round-robin's at N >= 8; throughput >= 0.9 x N x single."""
    by = {(r["n"], r["router"]): r for r in rows}
    ok = True
    for n in sorted({r["n"] for r in rows}):
        prefix, rr = by[(n, "prefix-aware")], by[(n, "round-robin")]
        ratio = prefix["ttft_p50_ms"] / rr["ttft_p50_ms"]
        fine_ttft = n < 8 or ratio <= 0.5
        fine_tput = prefix["scaling"] >= 0.9
        ok = ok and fine_ttft and fine_tput
        print(
            f"N={n}: TTFT p50 prefix-aware / round-robin = {ratio:.2f}"
            f"{' (limit 0.50)' if n >= 8 else ''}; throughput / (N x single) = {prefix['scaling']:.2f} (floor 0.90)"
            f": {'ok' if fine_ttft and fine_tput else 'MISSED'}"
        )
    return ok


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """TTFT p50/p90 and throughput scaling against N, one line per router."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, style in zip(POLICIES, ("o-", "s--", "^:"), strict=True):
        mine = [r for r in rows if r["router"] == name]
        ns = [r["n"] for r in mine]
        left.plot(ns, [r["ttft_p50_ms"] for r in mine], style, label=f"{name} p50")
        left.plot(ns, [r["ttft_p90_ms"] for r in mine], style, alpha=0.35, label=f"{name} p90")
        right.plot(ns, [r["scaling"] for r in mine], style, label=name)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(REPLICA_COUNTS, [str(n) for n in REPLICA_COUNTS])
        ax.set_xlabel("replicas (N)")
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("TTFT ms (simulated)")
    left.set_title("Time to first token, multi-turn chat")
    right.axhline(0.9, color="grey", lw=0.8, ls="--")
    right.set_ylabel("tok/s / (N x single replica)")
    right.set_title("Throughput scaling")
    left.legend(fontsize=7, ncol=2)
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def compare(args: argparse.Namespace, costs: StepCosts) -> None:
    """A real run's summary beside the simulator's prediction for the same workload."""
    run = json.loads(args.compare.read_text())
    args.seed = run["spec"]["seed"]
    args.think = run["spec"]["think_s"]
    args.duration, args.warmup = run["duration_s"], run["warmup_s"]
    n = args.replicas[0]
    args.users_per_replica = run["users"] / n  # for the record; the run's own user count is simulated
    measured = run["summary"]
    print(f"{run['users']} users on {n} replicas, {args.duration:g} s, warm-up {args.warmup:g} s")
    print("| router | source | TTFT p50 ms | TTFT p90 ms | tok/s | cached prompt share | later turns with cache |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.router} | measured | {measured['ttft_p50_ms']:.0f} | {measured['ttft_p90_ms']:.0f} | "
        f"{measured['tok_s']:.1f} | {measured['cached_fraction']:.2f} | {measured['later_turns_with_cache']:.2f} |"
    )
    clock = SimClock()
    policy = POLICIES[args.router](args.seed, args, clock)
    sim = Simulation(
        n,
        policy,
        costs,
        Workload(WorkloadSpec.from_dict(run["spec"])),
        users=run["users"],
        duration_s=args.duration,
        extra_overhead_s=args.extra_overhead_ms / 1000,
        clock=clock,
    )
    s = summarize(sim.run(), args.warmup, args.duration)
    print(
        f"| {args.router} | simulated | {s['ttft_p50_ms']:.0f} | {s['ttft_p90_ms']:.0f} | {s['tok_s']:.1f} | "
        f"{s['cached_fraction']:.2f} | {s['later_turns_with_cache']:.2f} |"
    )
    print(
        f"simulated / measured: TTFT p50 {s['ttft_p50_ms'] / measured['ttft_p50_ms']:.2f}, "
        f"TTFT p90 {s['ttft_p90_ms'] / measured['ttft_p90_ms']:.2f}, tok/s {s['tok_s'] / measured['tok_s']:.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--costs", type=Path, default=REPO / "bench" / "step_costs_t1.json")
    parser.add_argument("--replicas", type=int, nargs="+", default=list(REPLICA_COUNTS))
    parser.add_argument(
        "--users-per-replica", type=float, default=4, help="4 keeps one replica busy ~90% of the time, unsaturated."
    )
    parser.add_argument("--duration", type=float, default=300.0, help="Simulated seconds during which users ask.")
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--think", type=float, default=WorkloadSpec().think_s)
    parser.add_argument("--system-prompts", type=int, default=WorkloadSpec().system_prompts)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single-groups", type=int, default=8, help="Runs averaged for the N = 1 baseline.")
    parser.add_argument(
        "--cost-scale", type=float, default=1.0, help="Multiply every step cost (replicas sharing cores are slower)."
    )
    parser.add_argument("--slots", type=int, help="Sequence slots per replica (default: the measured server's).")
    parser.add_argument("--imbalance-threshold", type=int, default=DEFAULT_IMBALANCE_THRESHOLD)
    parser.add_argument("--capacity-blocks", type=int, default=2048)
    parser.add_argument("--shared-threshold", type=int, default=0)
    parser.add_argument("--placement", choices=PLACEMENTS, default="stalest", help="How new conversations are placed.")
    parser.add_argument("--idle-s", type=float, help="Quiet seconds that end a conversation (default: measured).")
    parser.add_argument("--extra-overhead-ms", type=float, default=0.0, help="Added per request (a router's hop).")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "router-sim.png")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "router_sim.json")
    parser.add_argument("--compare", type=Path, help="A chat_workload.py --out file: predict that run.")
    parser.add_argument("--router", choices=list(POLICIES), default="prefix-aware", help="The router of --compare.")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--per-replica", action="store_true", help="Print each replica's share of the load.")
    args = parser.parse_args()
    costs = StepCosts.load(args.costs, args.slots, args.cost_scale)
    args.replica_slots = costs.slots  # the router knows the replicas' slots, as the Ray router does from settings
    if args.compare:
        compare(args, costs)
        return 0
    rows = table(args, costs)
    print()
    ok = check(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"costs": costs.__dict__, "args": vars(args) | {"costs": str(args.costs)}, "rows": rows},
            default=str,
            indent=1,
        )
    )
    plot(rows, args.plot)
    print(f"plot: {args.plot}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
