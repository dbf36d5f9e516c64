"""Merging replicas' Prometheus metrics into one scrape."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from microserve.scale.exposition import merge

A = """# HELP num_requests_running Sequences decoding.
# TYPE num_requests_running gauge
num_requests_running{model_name="m"} 2.0
# HELP ttft Seconds to the first token.
# TYPE ttft histogram
ttft_bucket{le="0.1",model_name="m"} 1.0
ttft_bucket{le="+Inf",model_name="m"} 3.0
ttft_sum{model_name="m"} 0.9
ttft_count{model_name="m"} 3.0
"""
B = A.replace("2.0", "5.0").replace("3.0", "4.0") + "# TYPE up gauge\nup 1\n"


def test_samples_are_labelled_and_families_stay_whole() -> None:
    text = merge([("r1", A), ("r2", B)])
    families = {f.name: f for f in text_string_to_metric_families(text)}
    running = {s.labels["replica"]: s.value for s in families["num_requests_running"].samples}
    assert running == {"r1": 2.0, "r2": 5.0}
    counts = {s.labels["replica"]: s.value for s in families["ttft"].samples if s.name == "ttft_count"}
    assert counts == {"r1": 3.0, "r2": 4.0}
    assert families["up"].samples[0].labels == {"replica": "r2"}
    assert text.count("# TYPE ttft histogram") == 1
    # The text format wants each family's lines together: r2's samples follow r1's, not the end of the text.
    lines = text.splitlines()
    assert lines.index('num_requests_running{replica="r2",model_name="m"} 5.0') < lines.index(
        "# HELP ttft Seconds to the first token."
    )


def test_odd_replica_names_are_escaped() -> None:
    text = merge([('a"b', "x 1\n")])
    assert text == 'x{replica="a\\"b"} 1\n'
