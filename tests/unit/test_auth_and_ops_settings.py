"""API key loading and the operations settings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from microserve.server.auth import ApiKeyMiddleware, KeyFileError, is_public, load_key_digests
from microserve.settings import Settings


def test_keys_from_env_and_file_plain_or_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROSERVE_API_KEYS", " a-key ,b-key,")
    keys = tmp_path / "keys"
    keys.write_text(f"# comment\n\nc-key\nsha256:{hashlib.sha256(b'd-key').hexdigest().upper()}\n")
    settings = Settings(api_key_file=keys)
    assert "a-key" not in repr(settings)  # a SecretStr
    gate = ApiKeyMiddleware(app=None, digests=load_key_digests(settings))  # type: ignore[arg-type]
    assert all(gate._valid(k) for k in ("a-key", "b-key", "c-key", "d-key"))
    assert not any(gate._valid(k) for k in ("", "a-ke", "a-key ", "sha256:" + hashlib.sha256(b"d-key").hexdigest()))


def test_a_malformed_digest_line_is_an_error_without_echoing_it(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("ok-key\nsha256:not-hex-secret\n")
    with pytest.raises(KeyFileError) as info:
        load_key_digests(Settings(api_key_file=keys))
    assert ":2:" in str(info.value) and "not-hex-secret" not in str(info.value)
    with pytest.raises(KeyFileError):
        load_key_digests(Settings(api_key_file=tmp_path / "missing"))


def test_no_keys_means_no_auth() -> None:
    assert load_key_digests(Settings()) == []


def test_public_paths() -> None:
    assert is_public("/v1/health/ready", False) and is_public("/health", False)
    assert not is_public("/v1/metrics", False) and is_public("/v1/metrics", True)
    assert not is_public("/v1/chat/completions", True) and not is_public("/v1/healthz", True)


def test_nim_jsonl_logging_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().log_format == "text"
    monkeypatch.setenv("NIM_JSONL_LOGGING", "1")
    assert Settings().log_format == "json"
    monkeypatch.setenv("NIM_JSONL_LOGGING", "0")
    assert Settings().log_format == "text"
    assert Settings(log_format="JSON").log_format == "json"


def test_queue_defaults_to_four_times_the_slots() -> None:
    assert Settings(parallel=3).queue_limit(3) == 12
    assert Settings(parallel=3, max_queue=0).queue_limit(3) == 0
