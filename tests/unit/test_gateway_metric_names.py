"""The load gauges are exported a second time under the vLLM names that the Gateway API Inference Extension's
endpoint picker scrapes, with the same labels and values as microserve's own."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from microserve.engines.base import EncoderStats, EngineStats
from microserve.observability.metrics import Metrics

ALIASES = {
    "num_requests_running": "vllm:num_requests_running",
    "num_requests_waiting": "vllm:num_requests_waiting",
    "kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
}


def samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_gateway_names_carry_the_same_samples_as_microserves_own() -> None:
    metrics = Metrics()
    # Two text models with different loads and one encoder: running, waiting (engine + admission queue), KV use.
    load = [
        ("chat", EngineStats(3, 2, 8, 300, 1000, 0, 0), 4),
        ("base", EngineStats(1, 0, 8, 25, 100, 0, 0), 0),
    ]
    metrics.watch_load(
        lambda: load, lambda: [("embed", EncoderStats(forward_passes=2, inputs=9, waiting=0, max_batch=32), 5, 7)]
    )
    text = metrics.render().decode()
    found = samples(text)
    for own, gateway in ALIASES.items():
        assert found[gateway] == found[own], (own, gateway)
        assert f"# TYPE {gateway} gauge" in text
    assert found["vllm:num_requests_waiting"][(("model_name", "chat"),)] == 6.0
    assert found["vllm:num_requests_running"][(("model_name", "embed"),)] == 5.0
    assert found["vllm:kv_cache_usage_perc"][(("model_name", "base"),)] == 0.25


def test_gateway_names_follow_the_load_at_each_scrape() -> None:
    metrics = Metrics()
    stats = {"running": 0}
    metrics.watch_load(lambda: [("m", EngineStats(stats["running"], 0, 4, 0, 100, 0, 0), 0)])
    assert samples(metrics.render().decode())["vllm:num_requests_running"] == {(("model_name", "m"),): 0.0}
    stats["running"] = 2
    assert samples(metrics.render().decode())["vllm:num_requests_running"] == {(("model_name", "m"),): 2.0}
