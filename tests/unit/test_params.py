"""Request fields to engine parameters, and the context checks."""

from __future__ import annotations

import pytest

from microserve.errors import InvalidRequest
from microserve.protocol.chat import ChatCompletionRequest
from microserve.services.generation import resolve_max_tokens, sampling_params, stop_strings


def test_stop_normalisation() -> None:
    assert stop_strings(None) == ()
    assert stop_strings("x") == ("x",)
    assert stop_strings(["a", "", "b"]) == ("a", "b")
    with pytest.raises(InvalidRequest) as info:
        stop_strings(["1", "2", "3", "4", "5"])
    assert info.value.param == "stop"


def test_max_tokens_defaults_to_the_room_left() -> None:
    assert resolve_max_tokens(None, 100, 4096) == 3996
    assert resolve_max_tokens(50, 100, 4096) == 50


def test_over_context_names_both_numbers() -> None:
    with pytest.raises(InvalidRequest) as info:
        resolve_max_tokens(200, 4000, 4096)
    assert "4096" in info.value.message and "4000" in info.value.message and "200" in info.value.message
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequest):
        resolve_max_tokens(None, 4096, 4096)


def test_sampling_defaults_follow_openai() -> None:
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])  # type: ignore[list-item]
    params = sampling_params(request, 10)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (1.0, 1.0, 0, 1.0)
    assert params.max_tokens == 10 and params.seed is None and not params.ignore_eos


def test_extensions_map_through() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "temperature": 0,
            "top_k": 40,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "ignore_eos": True,
            "seed": 3,
        }
    )
    params = sampling_params(request, 5)
    assert (params.temperature, params.top_k, params.min_p, params.repetition_penalty) == (0.0, 40, 0.05, 1.1)
    assert params.ignore_eos and params.seed == 3
