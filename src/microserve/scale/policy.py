"""Which replica serves a request: by prompt prefix, then by load. Pure Python, shared by the Ray router and the
simulator in ``bench/router_sim.py``.

The prefix-aware rule, for a request with a prefix key (see :mod:`microserve.scale.prefix`):

1. Find the longest prefix of the key that a candidate replica was sent before; those replicas are its *holders*.
2. If the match covers a whole earlier prompt (a conversation's next turn: the last prompt plus its reply and a
   new question), the least loaded holder takes the request (a *prefix hit*), unless its queue is longer than the
   least loaded candidate's by more than ``imbalance_threshold``: then the least loaded candidate does (a *load
   fallback*), since waiting behind a long queue costs more than recomputing the prefix.
3. Any other prompt starts a new conversation (no replica holds it as a whole earlier prompt; at most a shared
   system prompt). It takes a sequence slot wherever it goes, and a replica keeps the KV of its most recent
   conversations only, as many as it has ``slots``: so it goes where a slot is free, else where the conversation
   it would evict has been quiet longest (``placement="stalest"``). Queue lengths cannot tell this: between turns
   a conversation holds a slot with no request in flight. Ties go to fewer live conversations, a shorter queue,
   the holder of the shared part of the prompt, then at random.
4. With ``placement="two_choices"`` a new conversation goes to the less loaded of two replicas picked at random
   (power of two choices, a *new prefix*), and one that shares only part of earlier prompts goes to the least
   loaded holder of that part if it is no busier than the pick (plus ``shared_threshold``; a *shared prefix*).

The router tracks conversations by the last block of the last prompt each sent (:class:`Conversations`): a next
turn extends it and moves it, one quiet for longer than twice its usual gap between turns counts as ended.

Between equally loaded replicas, the one holding less cached prefix wins, so that conversations arriving one at a
time still spread. What a replica holds is a guess from what it was sent: a bounded LRU of block hashes per
replica, sized to about what its prefix cache keeps. The state is bounded by ``capacity_blocks`` per replica,
whatever the traffic.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from microserve.scale.prefix import PrefixKey

Reason = Literal[
    "prefix_hit", "shared_prefix", "load_fallback", "new_prefix", "no_prefix", "least_loaded", "round_robin"
]
REASONS: tuple[Reason, ...] = (
    "prefix_hit",
    "shared_prefix",
    "load_fallback",
    "new_prefix",
    "no_prefix",
    "least_loaded",
    "round_robin",
)

# Defaults sized for a microserve replica on the CPU: 8 sequence slots of a few hundred to a few thousand tokens,
# in 16-token blocks. A next turn leaves its replica only when that one has a whole batch (8) more in flight than
# the least loaded: moving re-prefills the whole history there and evicts another conversation's, which under load
# cost more throughput than the wait (see docs/scaling.md).
DEFAULT_CAPACITY_BLOCKS = 2048
# How a new conversation (a prompt whose prefix no replica holds as a whole earlier prompt) is placed: where the
# slot it would take holds the stalest conversation, or on the less loaded of two random replicas.
Placement = Literal["stalest", "two_choices"]
PLACEMENTS: tuple[Placement, ...] = ("stalest", "two_choices")
DEFAULT_SLOTS = 8
DEFAULT_IMBALANCE_THRESHOLD = 8
DEFAULT_SHARED_THRESHOLD = 0
# A conversation counts as live on its replica until it has been quiet this many times its usual gap between turns
# (measured), and at least MIN_IDLE_S; before any gap is measured, INITIAL_IDLE_S.
IDLE_GAP_FACTOR = 2.0
MIN_IDLE_S = 1.0
INITIAL_IDLE_S = 30.0
GAP_SAMPLES = 256


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes and why; ``matched`` is how many leading blocks the chosen replica was thought to
    hold."""

    replica: str
    reason: Reason
    matched: int = 0


class RoutingPolicy(Protocol):
    """What a router asks of a policy: a choice, then word of where the request went and of replicas gone."""

    counts: Counter[Reason]

    def choose(self, key: PrefixKey | None, queues: Mapping[str, int]) -> Decision:
        """Pick one of ``queues``' replicas (id -> requests in flight or waiting there) for a request."""
        ...

    def routed(self, replica: str, key: PrefixKey | None) -> None:
        """The request went to ``replica`` (the router may have overruled the choice, e.g. a full replica)."""
        ...

    def remove(self, replica: str) -> None:
        """``replica`` is gone: forget it."""
        ...


def _least_loaded(
    queues: Mapping[str, int], among: Iterable[str], rng: random.Random, held: Callable[[str], int] | None = None
) -> str:
    # Equal queues go to the replica holding the least cached prefix (``held``), which spreads new conversations
    # evenly even when requests come one at a time; then at random: always taking the first would pile requests
    # on one replica.
    ids = list(among)

    def rank(r: str) -> tuple[int, int]:
        return queues[r], held(r) if held is not None else 0

    low = min(rank(r) for r in ids)
    lowest = [r for r in ids if rank(r) == low]
    return lowest[0] if len(lowest) == 1 else rng.choice(lowest)


@dataclass(frozen=True, slots=True)
class Match:
    """The longest prefix of a key that candidates hold: its length in blocks, the replicas holding it, and those
    of them for which it was a whole earlier prompt."""

    depth: int = 0
    holders: frozenset[str] = field(default_factory=frozenset)
    whole: frozenset[str] = field(default_factory=frozenset)


class ReplicaPrefixes:
    """Per replica, a bounded LRU of the block hashes sent to it (each marked if an earlier prompt ended there),
    with an index from hash to the replicas that hold it, so that a lookup costs one dict probe per block rather
    than one per block and replica."""

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError("capacity_blocks must be at least 1")
        self.capacity_blocks = capacity_blocks
        # block hash -> True where a prompt sent to the replica ended at that block
        self._lru: dict[str, OrderedDict[int, bool]] = {}
        self._holders: dict[int, set[str]] = {}

    def __len__(self) -> int:
        """Block hashes held, summed over replicas."""
        return sum(len(lru) for lru in self._lru.values())

    @property
    def replicas(self) -> set[str]:
        """The replicas that hold any block."""
        return set(self._lru)

    def held(self, replica: str) -> int:
        """How many block hashes ``replica`` holds."""
        return len(self._lru.get(replica, ()))

    def longest(self, key: PrefixKey, candidates: Iterable[str]) -> Match:
        """The longest prefix of ``key`` that any of ``candidates`` holds."""
        allowed = set(candidates)
        for depth in range(len(key.blocks), 0, -1):
            block = key.blocks[depth - 1]
            holders = self._holders.get(block)
            if holders:
                found = holders & allowed
                if found:
                    whole = frozenset(r for r in found if self._lru[r].get(block))
                    return Match(depth, frozenset(found), whole)
        return Match()

    def add(self, replica: str, key: PrefixKey) -> None:
        """Record that ``replica`` was sent ``key``'s blocks; the least recently sent blocks make room."""
        lru = self._lru.setdefault(replica, OrderedDict())
        blocks = key.blocks[: self.capacity_blocks]
        # Longest prefix first, shortest last: the shortest blocks are then the most recent, so eviction eats a
        # prompt from its tail and what remains is always a whole prefix, as in the replica's own cache.
        for i in range(len(blocks) - 1, -1, -1):
            block = blocks[i]
            ended = i == len(blocks) - 1
            if block in lru:
                lru[block] = lru[block] or ended
                lru.move_to_end(block)
            else:
                lru[block] = ended
                self._holders.setdefault(block, set()).add(replica)
        while len(lru) > self.capacity_blocks:
            old, _ = lru.popitem(last=False)
            self._drop(old, replica)

    def remove(self, replica: str) -> None:
        """Forget everything ``replica`` held."""
        for block in self._lru.pop(replica, OrderedDict()):
            self._drop(block, replica)

    def _drop(self, block: int, replica: str) -> None:
        holders = self._holders.get(block)
        if holders is not None:
            holders.discard(replica)
            if not holders:
                del self._holders[block]


class Conversations:
    """The conversations each replica holds, as the router saw them: a conversation is the last prompt it sent (its
    *tip*, the prompt's last block hash) and when; a next turn, whose key extends the tip, moves it. One that has
    been quiet longer than the idle window has ended, or will find its KV evicted by the time it returns, and no
    longer counts.

    The idle window is ``idle_s`` when given, else measured: ``IDLE_GAP_FACTOR`` times the 90th percentile of the
    last ``GAP_SAMPLES`` gaps between a conversation's turns, so that it follows the users' think times and the
    replicas' latency instead of a guess. The state is bounded: tips are dropped once idle, and at most
    ``capacity`` per replica are kept."""

    def __init__(self, capacity: int, *, idle_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        if idle_s is not None and idle_s <= 0:
            raise ValueError("idle_s must be > 0")
        self.capacity = capacity
        self.idle_s = idle_s
        self._clock = clock
        self._tips: dict[str, OrderedDict[int, float]] = {}  # replica -> tip -> when last sent, oldest first
        self._where: dict[int, str] = {}  # tip -> replica
        self._gaps: deque[float] = deque(maxlen=GAP_SAMPLES)
        self._window: float | None = None  # the measured window, until the next gap

    def window(self) -> float:
        """Seconds a conversation stays live without a new turn."""
        if self.idle_s is not None:
            return self.idle_s
        if self._window is None:
            if not self._gaps:
                return INITIAL_IDLE_S
            ordered = sorted(self._gaps)
            self._window = max(MIN_IDLE_S, IDLE_GAP_FACTOR * ordered[int(0.9 * (len(ordered) - 1))])
        return self._window

    def live(self, replica: str) -> int:
        """Conversations live on ``replica``."""
        tips = self._tips.get(replica)
        if not tips:
            return 0
        self._expire(replica, tips, self._clock())
        return len(tips)

    def stalest(self, replica: str, slots: int) -> float:
        """When ``replica``'s ``slots``-th most recent conversation last sent a prompt: the one a new conversation
        would evict from a replica with ``slots`` sequence slots that keep the most recent; -inf while fewer than
        ``slots`` are held (a slot is free)."""
        tips = self._tips.get(replica)
        if not tips or len(tips) < slots:
            return -math.inf
        return next(itertools.islice(reversed(tips.values()), slots - 1, None))

    def held(self, replica: str) -> int:
        """Conversations remembered for ``replica``, live or not."""
        return len(self._tips.get(replica, ()))

    def routed(self, replica: str, key: PrefixKey) -> None:
        """A prompt with ``key`` went to ``replica``: the conversation it continues (if any) moves there."""
        now = self._clock()
        for block in reversed(key.blocks):
            previous = self._where.pop(block, None)
            if previous is not None:
                sent = self._tips[previous].pop(block)
                self._gaps.append(now - sent)
                self._window = None
                break
        tip = key.blocks[-1]
        self._where[tip] = replica
        tips = self._tips.setdefault(replica, OrderedDict())
        tips[tip] = now
        tips.move_to_end(tip)
        self._expire(replica, tips, now)
        while len(tips) > self.capacity:
            old, _ = tips.popitem(last=False)
            del self._where[old]

    def remove(self, replica: str) -> None:
        """Forget ``replica``'s conversations."""
        for tip in self._tips.pop(replica, OrderedDict()):
            self._where.pop(tip, None)

    def __len__(self) -> int:
        return len(self._where)

    def _expire(self, replica: str, tips: OrderedDict[int, float], now: float) -> None:
        horizon = now - self.window()
        while tips:
            tip, sent = next(iter(tips.items()))
            if sent >= horizon:
                break
            tips.popitem(last=False)
            del self._where[tip]


class PrefixAwarePolicy:
    """A conversation's next turn to the replica holding its history, unless that replica is too far behind the
    least loaded one; a new conversation where the slot it takes is free or holds the stalest conversation (or, with
    ``placement="two_choices"``, by power of two choices, following a shared prefix only at no extra wait)."""

    def __init__(
        self,
        *,
        capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        imbalance_threshold: int = DEFAULT_IMBALANCE_THRESHOLD,
        shared_threshold: int = DEFAULT_SHARED_THRESHOLD,
        placement: Placement = "stalest",
        idle_s: float | None = None,
        slots: int = DEFAULT_SLOTS,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if imbalance_threshold < 0 or shared_threshold < 0:
            raise ValueError("thresholds must be >= 0")
        if slots < 1:
            raise ValueError("slots must be at least 1")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}")
        self.imbalance_threshold = imbalance_threshold
        self.shared_threshold = shared_threshold
        self.placement = placement
        self.slots = slots
        self.prefixes = ReplicaPrefixes(capacity_blocks)
        self.conversations = Conversations(capacity_blocks, idle_s=idle_s, clock=clock)
        self.counts: Counter[Reason] = Counter()
        self._rng = rng or random.Random()

    def choose(self, key: PrefixKey | None, queues: Mapping[str, int]) -> Decision:
        """Pick a replica among ``queues`` for a request with ``key`` (None: no prompt, pick by load)."""
        if not queues:
            raise ValueError("no replica to choose from")
        decision = self._decide(key, queues)
        self.counts[decision.reason] += 1
        return decision

    def _decide(self, key: PrefixKey | None, queues: Mapping[str, int]) -> Decision:
        held = self.prefixes.held
        if key is None or not key.blocks:
            return Decision(self._two_choices(queues), "no_prefix")
        match = self.prefixes.longest(key, queues)
        if match.whole:
            best = _least_loaded(queues, match.whole, self._rng, held)
            if queues[best] - min(queues.values()) > self.imbalance_threshold:
                return Decision(_least_loaded(queues, queues, self._rng, self.conversations.live), "load_fallback")
            return Decision(best, "prefix_hit", match.depth)
        if self.placement == "stalest":
            chosen = self._stalest(queues, match.holders)
            if chosen in match.holders:
                return Decision(chosen, "shared_prefix", match.depth)
            return Decision(chosen, "new_prefix")
        if match.depth == 0:
            return Decision(self._two_choices(queues), "new_prefix")
        holder = _least_loaded(queues, match.holders, self._rng, held)
        pick = self._two_choices(queues)
        if queues[holder] - queues[pick] <= self.shared_threshold:
            return Decision(holder, "shared_prefix", match.depth)
        return Decision(pick, "new_prefix")

    def routed(self, replica: str, key: PrefixKey | None) -> None:
        """Remember that ``replica`` now holds ``key``'s prefix and the conversation it belongs to."""
        if key is not None and key.blocks:
            self.prefixes.add(replica, key)
            self.conversations.routed(replica, key)

    def remove(self, replica: str) -> None:
        """Forget a replica that has gone (its cache went with it)."""
        self.prefixes.remove(replica)
        self.conversations.remove(replica)

    def _stalest(self, queues: Mapping[str, int], holders: frozenset[str]) -> str:
        # A new conversation takes a slot: a free one if a replica has one, else the one holding the conversation
        # that has been quiet longest (a replica's slots keep the most recent), so that no replica holds more live
        # conversations than it has slots while another idles. Then fewer live conversations, a shorter queue, the
        # shared part of the prompt already there, less cached, and chance decide.
        def rank(r: str) -> tuple[float, int, int, bool, int]:
            live = self.conversations.live(r)  # first: it forgets the conversations that have ended
            stale = self.conversations.stalest(r, self.slots)
            return stale, live, queues[r], r not in holders, self.prefixes.held(r)

        ranks = {r: rank(r) for r in queues}
        low = min(ranks.values())
        lowest = [r for r, v in ranks.items() if v == low]
        return lowest[0] if len(lowest) == 1 else self._rng.choice(lowest)

    def _two_choices(self, queues: Mapping[str, int]) -> str:
        ids = list(queues)
        pair = ids if len(ids) <= 2 else self._rng.sample(ids, 2)
        return _least_loaded(queues, pair, self._rng, self.prefixes.held)


class LeastLoadedPolicy:
    """The replica with the fewest requests, ties at random; blind to prefixes."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self.counts: Counter[Reason] = Counter()
        self._rng = rng or random.Random()

    def choose(self, key: PrefixKey | None, queues: Mapping[str, int]) -> Decision:
        """The least loaded of ``queues``."""
        if not queues:
            raise ValueError("no replica to choose from")
        self.counts["least_loaded"] += 1
        return Decision(_least_loaded(queues, queues, self._rng), "least_loaded")

    def routed(self, replica: str, key: PrefixKey | None) -> None:
        """Nothing to remember."""

    def remove(self, replica: str) -> None:
        """Nothing to forget."""


class RoundRobinPolicy:
    """Each replica in turn, in the order the replicas are listed; blind to prefixes and load."""

    def __init__(self) -> None:
        self.counts: Counter[Reason] = Counter()
        self._next = 0

    def choose(self, key: PrefixKey | None, queues: Mapping[str, int]) -> Decision:
        """The next replica in turn."""
        if not queues:
            raise ValueError("no replica to choose from")
        ids = list(queues)
        replica = ids[self._next % len(ids)]
        self._next += 1
        self.counts["round_robin"] += 1
        return Decision(replica, "round_robin")

    def routed(self, replica: str, key: PrefixKey | None) -> None:
        """Nothing to remember."""

    def remove(self, replica: str) -> None:
        """Nothing to forget."""
