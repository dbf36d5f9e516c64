"""The schemathesis run of test_fuzz.py against a server whose chat model runs on the vLLM engine: bad input is a
clear 4xx on this engine too. Fewer examples per operation than the llama.cpp run (vLLM's CPU build is slower).
Runs in the vLLM job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import test_fuzz
from conftest import Server, start_vllm_server
from schemathesis.generation import GenerationMode

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def fuzzed_vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = Path(tmp_path_factory.mktemp("fuzz-vllm"))
    server = start_vllm_server(tmp, *test_fuzz.server_args(tmp), env={"MICROSERVE_API_KEYS": test_fuzz.KEY})
    yield server
    server.stop()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_schema_is_the_truth_on_the_vllm_engine(
    fuzzed_vllm_server: Server, mode: GenerationMode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(test_fuzz, "EXAMPLES", 10)
    test_fuzz.test_the_schema_is_the_truth_no_input_makes_a_5xx_and_errors_are_openai_shaped(fuzzed_vllm_server, mode)
