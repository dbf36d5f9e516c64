"""Which replica serves a request: by prompt prefix, then by load. Pure Python, shared by the Ray router and the
simulator in ``bench/router_sim.py``.

The prefix-aware rule, for a request with a prefix key (see :mod:`microserve.scale.prefix`):

1. Find the longest prefix of the key that a candidate replica was sent before; those replicas are its *holders*.
2. If the match covers a whole earlier prompt (a conversation's next turn: the last prompt plus its reply and a
   new question), the least loaded holder takes the request (a *prefix hit*), unless its queue is longer than the
   least loaded candidate's by more than ``imbalance_threshold``: then the least loaded candidate does (a *load
   fallback*), since waiting behind a long queue costs more than recomputing the prefix.
3. A prefix no candidate holds goes to the less loaded of two candidates picked at random (power of two choices,
   a *new prefix*): it spreads new conversations about as well as least-loaded does, without several routers
   herding onto the same replica on slightly stale queue lengths.
4. A match that covers only part of earlier prompts (a system prompt or few-shot examples that many conversations
   share) is worth less than a conversation's own history, and following it would pile every new conversation onto
   the first replicas that saw the shared part: the least loaded holder takes it only if it is no busier than the
   power-of-two pick (plus ``shared_threshold``), else the pick does (a *shared prefix* or a *new prefix*).

Between equally loaded replicas, the one holding less cached prefix wins, so that conversations arriving one at a
time still spread. What a replica holds is a guess from what it was sent: a bounded LRU of block hashes per
replica, sized to about what its prefix cache keeps. The state is bounded by ``capacity_blocks`` per replica,
whatever the traffic.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
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
# in 16-token blocks; a queue four requests longer than another replica's is half a batch of waiting.
DEFAULT_CAPACITY_BLOCKS = 2048
DEFAULT_IMBALANCE_THRESHOLD = 4
DEFAULT_SHARED_THRESHOLD = 0


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


class PrefixAwarePolicy:
    """A conversation's next turn to the replica holding its history, unless that replica is too far behind the
    least loaded one; new prefixes by power of two choices; shared prefixes only when they cost no extra wait."""

    def __init__(
        self,
        *,
        capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        imbalance_threshold: int = DEFAULT_IMBALANCE_THRESHOLD,
        shared_threshold: int = DEFAULT_SHARED_THRESHOLD,
        rng: random.Random | None = None,
    ) -> None:
        if imbalance_threshold < 0 or shared_threshold < 0:
            raise ValueError("thresholds must be >= 0")
        self.imbalance_threshold = imbalance_threshold
        self.shared_threshold = shared_threshold
        self.prefixes = ReplicaPrefixes(capacity_blocks)
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
        if match.depth == 0:
            return Decision(self._two_choices(queues), "new_prefix")
        if match.whole:
            best = _least_loaded(queues, match.whole, self._rng, held)
            if queues[best] - min(queues.values()) > self.imbalance_threshold:
                return Decision(_least_loaded(queues, queues, self._rng, held), "load_fallback")
            return Decision(best, "prefix_hit", match.depth)
        holder = _least_loaded(queues, match.holders, self._rng, held)
        pick = self._two_choices(queues)
        if queues[holder] - queues[pick] <= self.shared_threshold:
            return Decision(holder, "shared_prefix", match.depth)
        return Decision(pick, "new_prefix")

    def routed(self, replica: str, key: PrefixKey | None) -> None:
        """Remember that ``replica`` now holds ``key``'s prefix."""
        if key is not None and key.blocks:
            self.prefixes.add(replica, key)

    def remove(self, replica: str) -> None:
        """Forget a replica that has gone (its cache went with it)."""
        self.prefixes.remove(replica)

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
