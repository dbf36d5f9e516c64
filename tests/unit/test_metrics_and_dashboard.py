"""The metrics registry exports every name the Grafana dashboard queries, per app and without global state."""

from __future__ import annotations

import json
import re
from pathlib import Path

from microserve.engines.base import EncoderStats, EngineStats
from microserve.observability.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "microserve-dashboard.json"


def exported_names() -> set[str]:
    metrics = Metrics()
    metrics.watch_load(
        lambda: [("m", EngineStats(1, 2, 4, 50, 100, 7, 9), 3)],
        lambda: [("e", EncoderStats(forward_passes=4, inputs=24, waiting=0, max_batch=32), 2, 1)],
    )
    for child in (metrics.ttft, metrics.itl, metrics.e2e, metrics.queue_time):
        child.labels("m").observe(0.1)
    metrics.prompt_tokens.labels("m").inc(5)
    metrics.generation_tokens.labels("m").inc(2)
    metrics.rejected.labels("m", "queue_full").inc()
    metrics.success.labels("m", "stop").inc()
    metrics.http.labels("GET", "/v1/models", "200").inc()
    text = metrics.render().decode()
    assert 'num_requests_waiting{model_name="m"} 5.0' in text  # engine queue + admission queue
    assert 'kv_cache_usage_perc{model_name="m"} 0.5' in text
    assert 'encoder_mean_batch{model_name="e"} 6.0' in text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_dashboard_query_names_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {m for e in exprs for m in re.findall(r"([a-z_][a-z0-9_]*)\{", e)} - {"by"}
    exported = exported_names()
    assert queried, exprs
    assert queried <= exported, queried - exported


def test_apps_have_separate_registries() -> None:
    a, b = Metrics(), Metrics()
    a.prompt_tokens.labels("m").inc(3)
    assert 'prompt_tokens_total{model_name="m"} 3.0' in a.render().decode()
    assert 'prompt_tokens_total{model_name="m"}' not in b.render().decode()
