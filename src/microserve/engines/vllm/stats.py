"""vLLM's scheduler stats, kept as the latest snapshot for health, admission and metrics.

vLLM hands every engine step's ``SchedulerStats`` to its stat loggers; this one keeps the newest numbers (running and
waiting requests, KV-cache use) and adds up prefix-cache hits, instead of printing or exporting them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase


@dataclass(slots=True)
class SchedulerSnapshot:
    """The latest scheduler numbers vLLM reported."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    prefix_hits: int = 0  # prompt tokens served from the prefix cache, since start
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    steps: int = 0


def snapshot_logger(snapshot: SchedulerSnapshot) -> Callable[[Any, int], StatLoggerBase]:
    """A stat-logger factory (vLLM calls it with its config and engine index) that writes into ``snapshot``."""

    class _SnapshotLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is None:
                return
            snapshot.running = int(scheduler_stats.num_running_reqs)
            snapshot.waiting = int(scheduler_stats.num_waiting_reqs) + int(
                getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
            )
            snapshot.kv_usage = float(scheduler_stats.kv_cache_usage)
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:
                snapshot.prefix_hits += int(prefix.hits)
                snapshot.prefix_queries += int(prefix.queries)
            snapshot.steps += 1

        def log_engine_initialized(self) -> None:
            pass

    return _SnapshotLogger
