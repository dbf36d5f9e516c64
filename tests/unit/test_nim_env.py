"""NIM's environment names set the same settings as microserve's, and MICROSERVE_* wins when both are set."""

from __future__ import annotations

from pathlib import Path

import pytest

from microserve.settings import Settings

# NIM variable, a value, the MICROSERVE_ variable, another value, the field, and the parsed values.
ALIASES = [
    (
        "NIM_SERVED_MODEL_NAME",
        "my-llm",
        "MICROSERVE_SERVED_MODEL_NAME",
        "ours",
        "served_model_name",
        ["my-llm"],
        ["ours"],
    ),
    ("NIM_MODEL_NAME", "gemma-3-270m", "MICROSERVE_MODEL", "smollm2", "model", ["gemma-3-270m"], ["smollm2"]),
    ("NIM_MAX_MODEL_LEN", "2048", "MICROSERVE_CONTEXT_LENGTH", "1024", "context_length", 2048, 1024),
    ("NIM_SERVER_PORT", "9001", "MICROSERVE_PORT", "9002", "port", 9001, 9002),
    ("NIM_LOG_LEVEL", "DEBUG", "MICROSERVE_LOG_LEVEL", "warning", "log_level", "debug", "warning"),
    ("NIM_JSONL_LOGGING", "1", "MICROSERVE_LOG_FORMAT", "text", "log_format", "json", "text"),
    (
        "NIM_CACHE_PATH",
        "/nim/cache",
        "MICROSERVE_CACHE",
        "/ours/cache",
        "cache_dir",
        Path("/nim/cache"),
        Path("/ours/cache"),
    ),
    (
        "NIM_MODEL_PROFILE",
        "vllm-nvidia-bf16",
        "MICROSERVE_PROFILE",
        "llamacpp-cpu-q4_1",
        "profile",
        "vllm-nvidia-bf16",
        "llamacpp-cpu-q4_1",
    ),
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for nim, _, ours, *_ in ALIASES:
        monkeypatch.delenv(nim, raising=False)
        monkeypatch.delenv(ours, raising=False)


@pytest.mark.parametrize(
    ("nim", "value", "ours", "other", "field", "parsed", "parsed_ours"), ALIASES, ids=[a[0] for a in ALIASES]
)
def test_nim_alias_is_honoured_and_microserve_wins(
    monkeypatch: pytest.MonkeyPatch,
    nim: str,
    value: str,
    ours: str,
    other: str,
    field: str,
    parsed: object,
    parsed_ours: object,
) -> None:
    default = getattr(Settings(), field)
    monkeypatch.setenv(nim, value)
    assert getattr(Settings(), field) == parsed != default
    monkeypatch.setenv(ours, other)
    assert getattr(Settings(), field) == parsed_ours


def test_nim_values_in_nim_spellings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIM_LOG_LEVEL", "DEFAULT")
    monkeypatch.setenv("NIM_JSONL_LOGGING", "false")
    settings = Settings()
    assert (settings.log_level, settings.log_format) == ("info", "text")


def test_flags_beat_both_and_lists_split_on_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIM_SERVER_PORT", "9001")
    monkeypatch.setenv("MICROSERVE_PORT", "9002")
    monkeypatch.setenv("NIM_MODEL_NAME", "smollm2, ./tiny.gguf")
    monkeypatch.setenv("PORT", "1")  # unprefixed names are not ours
    settings = Settings(port=9003)
    assert settings.port == 9003 and settings.model == ["smollm2", "./tiny.gguf"]


def test_hf_hub_offline_means_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MICROSERVE_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Settings().offline is True
