"""The Ray Serve request router of the replica deployment: :class:`~microserve.scale.policy.PrefixAwarePolicy`
behind Ray's ``RequestRouter`` extension point.

Ray imports this module by path (``request_router_config.request_router_class``) in every process that holds a
handle to the replicas; nothing else in microserve imports it, so Ray stays an extra.

Ray calls ``choose_replicas(candidate_replicas, pending_request)`` for each request it routes. The request's
arguments are those the ingress passed to ``handle.remote``: a :class:`~microserve.scale.forward.ForwardedRequest`
whose ``prefix_key`` the ingress computed from the body. The answer is ranked: the policy's choice alone first, then
every other replica, so that when the chosen one is full (``max_ongoing_requests``) Ray falls back to the least
loaded of the rest instead of waiting. ``on_request_routed`` says where the request really went, and the policy
records that replica as holding the prefix.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from microserve.scale.policy import (
    DEFAULT_CAPACITY_BLOCKS,
    DEFAULT_IMBALANCE_THRESHOLD,
    DEFAULT_SHARED_THRESHOLD,
    DEFAULT_SLOTS,
    Placement,
    PrefixAwarePolicy,
)
from microserve.scale.prefix import PrefixKey

log = logging.getLogger(__name__)

ROUTER_PATH = "microserve.scale.router.PrefixLoadRouter"


def prefix_key_of(pending: PendingRequest | None) -> PrefixKey | None:
    """The prefix key the ingress attached to a request, if any."""
    if pending is None:
        return None
    for arg in [*pending.args, *pending.kwargs.values()]:
        key = getattr(arg, "prefix_key", None)
        if isinstance(key, PrefixKey):
            return key
    return None


class PrefixLoadRouter(RequestRouter):
    """Routes to the replica most likely to hold the request's prompt prefix, unless it is too far behind the
    least loaded one; new conversations where the slot they take holds the stalest conversation. Decisions are
    counted in a Ray metric, ``microserve_router_decisions`` (tag ``decision``)."""

    def initialize_state(
        self,
        imbalance_threshold: int = DEFAULT_IMBALANCE_THRESHOLD,
        capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        shared_threshold: int = DEFAULT_SHARED_THRESHOLD,
        slots: int = DEFAULT_SLOTS,
        placement: Placement = "stalest",
        **_: Any,
    ) -> None:
        """Called by Ray with ``request_router_config.request_router_kwargs``."""
        self.policy = PrefixAwarePolicy(
            imbalance_threshold=imbalance_threshold,
            capacity_blocks=capacity_blocks,
            shared_threshold=shared_threshold,
            slots=slots,
            placement=placement,
        )
        self._keys: dict[str, PrefixKey | None] = {}
        self._decisions = _decision_counter()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """One ranked choice: the policy's replica, then all the others."""
        if not candidate_replicas:
            return []
        queues = await self._queue_lengths(candidate_replicas)
        if not queues:
            return [candidate_replicas]  # no queue length known: let Ray probe and pick
        key = prefix_key_of(pending_request)
        decision = self.policy.choose(key, queues)
        if self._decisions is not None:
            self._decisions.inc(tags={"decision": decision.reason})
        if pending_request is not None:
            self._keys[pending_request.metadata.internal_request_id] = key
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        chosen = by_id[decision.replica]
        return [[chosen], [r for r in candidate_replicas if r is not chosen]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """The request went to ``replica_id``: it now holds the prefix."""
        key = self._keys.pop(pending_request.metadata.internal_request_id, None)
        if key is None:
            key = prefix_key_of(pending_request)
        self.policy.routed(replica_id.unique_id, key)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Ray's new replica set: forget what replicas no longer in it held."""
        super().update_replicas(replicas)
        live = {r.replica_id.unique_id for r in replicas}
        for gone in self.policy.prefixes.replicas - live:
            self.policy.remove(gone)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """A replica died: its cache died with it."""
        super().on_replica_actor_died(replica_id)
        self.policy.remove(replica_id.unique_id)

    async def _queue_lengths(self, replicas: list[RunningReplica]) -> dict[str, int]:
        # Requests in flight on each replica, from Ray's cache (kept current by the router's own sends and
        # completions) or, where it has none, by asking the replicas; a replica that does not answer is left out.
        queues: dict[str, int] = {}
        unknown: list[RunningReplica] = []
        for r in replicas:
            cached = self.replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            if cached is None:
                unknown.append(r)
            else:
                queues[r.replica_id.unique_id] = cached
        if unknown:
            for r, length in await self._probe_queue_lens(unknown, 0):
                if length is not None:
                    queues[r.replica_id.unique_id] = length
        # A bounded map: requests that were never routed (cancelled while pending) must not pile up.
        if len(self._keys) > 10_000:
            self._keys.clear()
        return queues


def _decision_counter() -> Any:
    try:
        from ray.serve import metrics

        return metrics.Counter(
            "microserve_router_decisions",
            description="Requests routed, by the router's reason: prefix_hit, load_fallback, new_prefix, no_prefix.",
            tag_keys=("decision",),
        )
    except Exception:  # metrics are a nicety: routing must work without them
        log.warning("router decision metric unavailable", exc_info=True)
        return None
