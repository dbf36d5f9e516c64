"""Schemathesis against the app's own OpenAPI schema: valid and invalid inputs for every operation.

The schema must be the truth: every request it calls valid is accepted (``positive_data_acceptance``: no 400), every
request it calls invalid is refused (``negative_data_rejection``), replies match their documented status codes,
content types and schemas, no input produces a 5xx, and every error is OpenAI's error body (Anthropic's on the
Messages routes). Generated requests name random models, so a request that passes the schema usually ends in a
documented 404 for its model: what is checked before the model is looked up (every field bound, the operator's
limits) is what this covers, and the checks behind the model (grammars, context length) have tests of their own.
Examples per operation are bounded (and generation is deterministic) so the run fits CI.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import Server, start_server
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

KEY = "sk-fuzz"
EXAMPLES = 30
CHECKS = [
    not_a_server_error,
    positive_data_acceptance,
    negative_data_rejection,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def server_args(tmp: Path) -> tuple[str, ...]:
    """The fuzzed server's options, whatever its engine: two slots, a small completion budget (generated requests
    may ask for anything, the server bounds the work), and the fine-tuning routes (on by default) keeping what the
    fuzzer uploads in the test's directory."""
    return (
        "--fine-tuning-dir",
        str(tmp / "fine_tuning"),
        "--lora-dir",
        str(tmp / "loras"),
        "--parallel",
        "2",
        "--max-tokens-limit",
        "8",
    )


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = Path(tmp_path_factory.mktemp("fuzz"))
    server = start_server(tmp, *server_args(tmp), env={"MICROSERVE_API_KEYS": KEY})
    yield server
    server.stop()


def operations(server: Server) -> list[Any]:
    document = httpx.get(f"{server.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=server.url)
    return [result.ok() for result in schema.get_all_operations()]


def check(case: Any) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    response = case.call(headers=headers, timeout=120)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    case.validate_response(response, checks=CHECKS, headers=headers)
    if response.status_code >= 400:
        body = response.json()
        error = body["error"]
        if case.path.startswith("/v1/messages"):  # Anthropic's routes answer in Anthropic's shape
            assert body["type"] == "error" and set(error) == {"type", "message"}, response.text
        else:
            assert set(error) == {"message", "type", "param", "code"}, response.text
        assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_schema_is_the_truth_no_input_makes_a_5xx_and_errors_are_openai_shaped(
    fuzzed_server: Server, mode: GenerationMode
) -> None:
    ops = operations(fuzzed_server)
    assert {(op.method.upper(), op.path) for op in ops} >= {("POST", "/v1/chat/completions"), ("GET", "/v1/metrics")}
    for operation in ops:
        if mode is GenerationMode.NEGATIVE and not operation.query and not operation.body:
            continue  # nothing to make invalid: no body, no query (a path's string parameter takes any text)
        # derandomize: the same examples every run, so a failure reproduces.
        run = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))(
            given(case=operation.as_strategy(generation_mode=mode))(check)
        )
        run()
    # The run really exercised the server: count the responses it gave.
    text = httpx.get(f"{fuzzed_server.v1}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    answered = sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("http_requests_total{")
    )
    assert answered >= 2 * len(ops)
    # Readiness said 503 while the model loaded; nothing else may have.
    assert [line for line in text.splitlines() if 'status="5' in line and "/health" not in line] == []
