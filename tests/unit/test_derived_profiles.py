"""Derived profiles: a manifest names the profile a file is made from and what its engine writes; the default chat
model prefers its F16 profile where it fits memory and keeps the shipped Q4_1 for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from microserve.catalog.manifest import DerivedSource, Manifest, PackagedSource, find_builtin
from microserve.catalog.profiles import ProfileError, check_all, select_profile
from microserve.catalog.store import ModelStore
from microserve.engines.registry import DerivationError, derive_artifact
from microserve.hardware import Hardware

ROOMY = Hardware("test cpu", 2, 2, 2, frozenset({"avx2"}), 8000, 6000, ())
SHORT = Hardware("test cpu", 2, 2, 2, frozenset({"avx2"}), 1000, 400, ())


def manifest(derived: dict[str, object], *, parent_format: str = "gguf") -> Manifest:
    text = {
        "id": "m",
        "task": "chat",
        "profiles": [
            {"id": "wide", "engine": "llamacpp", "format": "gguf", "source": {"kind": "derived", **derived}},
            {"id": "small", "engine": "llamacpp", "format": parent_format, "source": {"kind": "local", "path": "/m"}},
        ],
    }
    return Manifest.model_validate(text)


def test_the_default_chat_model_prefers_f16_where_it_fits_and_keeps_q4_1() -> None:
    smol = find_builtin("smollm2-135m-instruct")
    assert smol is not None
    f16, q4 = smol.profile("llamacpp-cpu-f16"), smol.profile("llamacpp-cpu-q4_1")
    assert f16 is not None and q4 is not None
    assert isinstance(f16.source, DerivedSource) and isinstance(q4.source, PackagedSource)
    assert (f16.source.profile, f16.source.type, f16.quantization) == ("llamacpp-cpu-q4_1", "F16", "F16")
    assert smol.parent(f16) == q4 and smol.parent(q4) is None
    assert f16.min_memory_mb > q4.min_memory_mb
    assert select_profile(smol, ROOMY).id == "llamacpp-cpu-f16"
    # Short of memory, the shipped file is chosen, and the F16 profile says why not.
    assert select_profile(smol, SHORT).id == "llamacpp-cpu-q4_1"
    checks = {c.profile.id: c for c in check_all(smol, SHORT)}
    assert any(f"needs {f16.min_memory_mb} MiB free RAM" in r for r in checks["llamacpp-cpu-f16"].reasons)
    assert select_profile(smol, ROOMY, "llamacpp-cpu-q4_1").id == "llamacpp-cpu-q4_1"
    # Both live in the cache under their own profile.
    store = ModelStore(Path("/cache"))
    assert store.path_for(smol) == Path("/cache/models/smollm2-135m-instruct/llamacpp-cpu-f16") / f16.source.file
    assert store.path_for(smol, q4).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert f16.source.describe() == "derived:llamacpp-cpu-q4_1/F16"


def test_a_derived_profile_yaml_parses() -> None:
    text = """
id: m
task: chat
profiles:
  - id: wide
    engine: llamacpp
    quantization: BF16
    source: {kind: derived, profile: small, type: BF16, file: m.BF16.gguf}
  - id: small
    engine: llamacpp
    source: {kind: local, path: /m.gguf}
"""
    parsed = Manifest.model_validate(yaml.safe_load(text))
    source = parsed.profiles[0].source
    assert isinstance(source, DerivedSource) and source.sha256 is None and source.file == "m.BF16.gguf"


@pytest.mark.parametrize(
    ("derived", "message"),
    [
        ({"profile": "absent", "type": "F16", "file": "x.gguf"}, "derived from `absent`, which m lacks"),
        ({"profile": "wide", "type": "F16", "file": "x.gguf"}, "derived itself"),
        ({"profile": "small", "type": "Q3_X", "file": "x.gguf"}, "asks for Q3_X; its engine llamacpp derives"),
        ({"profile": "small", "type": "F16", "file": "../x.gguf"}, "file"),
        ({"profile": "small", "type": "F16", "file": ".hidden"}, "file"),
        ({"profile": "small", "type": "F16"}, "file"),
    ],
)
def test_bad_derived_profiles_are_rejected(derived: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        manifest(derived)


def test_a_derived_profile_reads_the_format_it_is_made_from() -> None:
    with pytest.raises(ValidationError, match=r"\(gguf\) is derived from small \(safetensors\)"):
        manifest({"profile": "small", "type": "F16", "file": "x.gguf"}, parent_format="safetensors")


def test_the_engine_table_refuses_what_an_engine_cannot_derive(tmp_path: Path) -> None:
    with pytest.raises(DerivationError, match="the encoder engine cannot derive F16 artifacts"):
        derive_artifact("encoder", tmp_path / "a", tmp_path / "b", "F16")
    with pytest.raises(DerivationError, match=r"cannot derive Q2_K artifacts .*BF16, F16, F32, Q8_0"):
        derive_artifact("llamacpp", tmp_path / "a", tmp_path / "b", "Q2_K")


def test_forcing_an_unknown_profile_names_both() -> None:
    smol = find_builtin("smollm2")
    assert smol is not None
    with pytest.raises(ProfileError, match=r"llamacpp-cpu-f16.*llamacpp-cpu-q4_1"):
        select_profile(smol, ROOMY, "nope")
