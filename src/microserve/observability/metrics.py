"""Prometheus metrics under the names NIM and vLLM dashboards query, in a registry owned by the app."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from microserve.engines.base import EncoderStats, EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


TextLoad = Callable[[], Iterable[tuple[str, EngineStats, int]]]
EncoderLoad = Callable[[], Iterable[tuple[str, EncoderStats, int, int]]]


class _LoadCollector(Collector):
    """Gauges read from the engines and admission queues at scrape time, so they are never stale."""

    def __init__(self, sources: TextLoad, encoders: EncoderLoad | None = None, max_loras: int = 0) -> None:
        self._sources = sources
        self._encoders = encoders
        self._max_loras = max_loras

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily("num_requests_running", "Sequences decoding in the engine.", labels=["model_name"])
        waiting = GaugeMetricFamily(
            "num_requests_waiting", "Requests waiting for a slot (admission queue and engine).", labels=["model_name"]
        )
        kv = GaugeMetricFamily("kv_cache_usage_perc", "Fraction of KV-cache cells in use (0-1).", labels=["model_name"])
        prefix = CounterMetricFamily(
            "prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.", labels=["model_name"]
        )
        steps = CounterMetricFamily(
            "engine_steps", "Forward passes (decode steps) the engine has run.", labels=["model_name"]
        )
        loaded = GaugeMetricFamily(
            "lora_adapters_loaded", "LoRA adapters loaded in the engine's memory.", labels=["model_name"]
        )
        # vLLM's shape, which LoRA-aware routers read: the labels carry the adapter names, the value is a time.
        lora_info = GaugeMetricFamily(
            "lora_requests_info",
            "Adapters of the running and waiting requests (labels); the value is the time of the reading.",
            labels=["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        turn_wait = HistogramMetricFamily(
            "lora_turn_wait_steps",
            "Decode steps an adapter set with work waited for its turn (sets of different adapters decode apart).",
            labels=["model_name"],
        )
        now = time.time()
        for name, stats, queued in self._sources():
            running.add_metric([name], stats.running)
            waiting.add_metric([name], stats.waiting + queued)
            kv.add_metric([name], stats.kv_used / stats.kv_total if stats.kv_total else 0.0)
            prefix.add_metric([name], stats.prefix_hit_tokens)
            steps.add_metric([name], stats.steps)
            loaded.add_metric([name], stats.adapters_loaded)
            labels = [name, str(self._max_loras), ",".join(stats.running_adapters), ",".join(stats.waiting_adapters)]
            lora_info.add_metric(labels, now)
            if stats.turn_waits:
                cumulative = list(itertools.accumulate(stats.turn_waits))
                buckets = [(str(i), n) for i, n in enumerate(cumulative[:-1])] + [("+Inf", cumulative[-1])]
                total = sum(i * n for i, n in enumerate(stats.turn_waits))
                turn_wait.add_metric([name], buckets, total)
        encoders = self._collect_encoders(self._encoders, running, waiting) if self._encoders is not None else []
        yield from (running, waiting, kv, prefix, steps, loaded, lora_info, turn_wait, *encoders)
        # The Gateway API Inference Extension's endpoint picker reads a server's load under vLLM's names: the same
        # samples under those names let such a gateway route to microserve.
        yield from (_renamed(family, f"vllm:{family.name}") for family in (running, waiting, kv, lora_info))

    @staticmethod
    def _collect_encoders(
        encoders: EncoderLoad, running: GaugeMetricFamily, waiting: GaugeMetricFamily
    ) -> list[Metric]:
        passes = CounterMetricFamily(
            "encoder_forward_passes", "Forward passes of the sentence encoder.", labels=["model_name"]
        )
        inputs = CounterMetricFamily("encoder_inputs", "Inputs encoded (sentences or pairs).", labels=["model_name"])
        batch = GaugeMetricFamily(
            "encoder_mean_batch", "Inputs per forward pass since start (0 before the first).", labels=["model_name"]
        )
        for name, stats, admitted, queued in encoders():
            # Encoder requests share the request gauges: admitted requests run (a batch forms among them), requests
            # queued at the admission gate wait.
            running.add_metric([name], admitted)
            waiting.add_metric([name], queued)
            passes.add_metric([name], stats.forward_passes)
            inputs.add_metric([name], stats.inputs)
            batch.add_metric([name], stats.inputs / stats.forward_passes if stats.forward_passes else 0.0)
        return [passes, inputs, batch]


def _renamed(family: GaugeMetricFamily, name: str) -> GaugeMetricFamily:
    copy = GaugeMetricFamily(name, family.documentation)
    copy.samples = [sample._replace(name=name) for sample in family.samples]
    return copy


class Metrics:
    """Every metric of one app; nothing is registered globally, so several apps can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rejected = Counter(
            "num_requests_rejected", "Requests turned away by admission control.", ["model_name", "reason"], registry=r
        )
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens processed.", ["model_name"], registry=r)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated.", ["model_name"], registry=r)
        self.ttft = Histogram(
            "time_to_first_token_seconds",
            "Seconds from engine submission to the first token.",
            ["model_name"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "inter_token_latency_seconds",
            "Seconds between consecutive tokens of a sequence.",
            ["model_name"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "e2e_request_latency_seconds",
            "Seconds from admission to the last token, queueing included.",
            ["model_name"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "request_queue_time_seconds",
            "Seconds a request waited for a slot.",
            ["model_name"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.success = Counter(
            "request_success", "Finished sequences by finish reason.", ["model_name", "finished_reason"], registry=r
        )
        self.http = Counter(
            "http_requests", "HTTP responses by method, route and status.", ["method", "path", "status"], registry=r
        )
        # Looking a child up by its label values takes a lock and a few microseconds; every response counts one.
        self._http_children: dict[tuple[str, str, int], Any] = {}

    def count_response(self, method: str, route: str, status: int) -> None:
        """Count one HTTP response."""
        key = (method, route, status)
        child = self._http_children.get(key)
        if child is None:
            child = self._http_children[key] = self.http.labels(method, route, str(status))
        child.inc()

    def watch_load(self, sources: TextLoad, encoders: EncoderLoad | None = None, *, max_loras: int = 0) -> None:
        """Register the scrape-time gauges over ``sources``: (model, engine stats, queued requests) tuples, and
        over ``encoders``: (model, encoder stats, admitted requests, queued requests) tuples; ``max_loras`` is the
        adapter limit the LoRA gauge reports."""
        self.registry.register(_LoadCollector(sources, encoders, max_loras))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
