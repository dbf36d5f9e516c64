"""The store against real HTTP on loopback: plain URLs and huggingface_hub's own call path to a local Hub mirror."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from artifact_server import artifact_server

from microserve.catalog.manifest import HttpSource, HuggingFaceSource, Manifest, Profile
from microserve.catalog.resolve import lookup, resolve
from microserve.catalog.store import ArtifactError, ModelStore, sha256_file
from microserve.hardware import probe

PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def manifest_for(source: HttpSource | HuggingFaceSource) -> Manifest:
    profile = Profile(id="llamacpp-cpu", engine="llamacpp", source=source)
    return Manifest(id="remote", task="completion", profiles=[profile])


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".incomplete" in p.name]


def test_http_download_progress_verify_and_no_second_download(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with artifact_server({"/files/model.gguf": PAYLOAD}) as served:
        manifest = manifest_for(HttpSource(kind="http", url=f"{served.url}/files/model.gguf", sha256=DIGEST))
        store = ModelStore(tmp_path / "cache", tty=False)
        with caplog.at_level(logging.INFO, logger="microserve.catalog.store"):
            placed = store.ensure(manifest)
        assert placed == tmp_path / "cache" / "models" / "remote" / "llamacpp-cpu" / "model.gguf"
        assert placed.read_bytes() == PAYLOAD
        assert placed.with_name("model.gguf.sha256").read_text().split()[0] == DIGEST
        assert not leftovers(tmp_path)
        progress = [r.getMessage() for r in caplog.records if "downloading model.gguf" in r.getMessage()]
        percents = [int(line.split(": ")[1].split("%")[0]) for line in progress if "%" in line]
        assert len(percents) >= 5 and percents == sorted(percents) and percents[-1] == 100
        assert served.count("GET") == 1

        assert store.ensure(manifest) == placed
        assert served.count("GET") == 1, "a verified cached artifact is not downloaded again"


def test_progress_bar_on_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with artifact_server({"/m.gguf": PAYLOAD}) as served:
        manifest = manifest_for(HttpSource(kind="http", url=f"{served.url}/m.gguf", sha256=DIGEST))
        ModelStore(tmp_path, tty=True).ensure(manifest)
    err = capsys.readouterr().err
    assert "m.gguf" in err and "100%" in err and "3.1/3.1 MB" in err


def test_wrong_or_truncated_download_is_never_placed(tmp_path: Path) -> None:
    with artifact_server({"/bad.gguf": PAYLOAD[:-1] + b"x", "/cut.gguf": PAYLOAD}) as served:
        served.truncate.add("/cut.gguf")
        store = ModelStore(tmp_path)
        bad = manifest_for(HttpSource(kind="http", url=f"{served.url}/bad.gguf", sha256=DIGEST))
        with pytest.raises(ArtifactError) as info:
            store.ensure(bad)
        wrong = hashlib.sha256(PAYLOAD[:-1] + b"x").hexdigest()
        assert DIGEST in str(info.value) and wrong in str(info.value)
        assert not store.path_for(bad).exists()

        cut = manifest_for(HttpSource(kind="http", url=f"{served.url}/cut.gguf", sha256=DIGEST))
        with pytest.raises(ArtifactError):
            store.ensure(cut)
        assert not store.path_for(cut).exists()
        assert not leftovers(tmp_path)


def test_corrupted_cached_file_is_refused_naming_file_and_hashes(tmp_path: Path) -> None:
    with artifact_server({"/m.gguf": PAYLOAD}) as served:
        manifest = manifest_for(HttpSource(kind="http", url=f"{served.url}/m.gguf", sha256=DIGEST))
        store = ModelStore(tmp_path)
        placed = store.ensure(manifest)
        with placed.open("r+b") as handle:
            handle.seek(1000)
            handle.write(b"tampered")
        with pytest.raises(ArtifactError) as info:
            store.ensure(manifest)
        message = str(info.value)
        assert str(placed) in message and DIGEST in message and sha256_file(placed) in message
        assert served.count("GET") == 1, "a corrupt file is refused, not silently re-downloaded"


def test_offline_never_touches_the_network(tmp_path: Path) -> None:
    with artifact_server({"/m.gguf": PAYLOAD}) as served:
        manifest = manifest_for(HttpSource(kind="http", url=f"{served.url}/m.gguf", sha256=DIGEST))
        with pytest.raises(ArtifactError, match="offline"):
            ModelStore(tmp_path, offline=True).ensure(manifest)
        assert served.requests == []


@pytest.fixture
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    hf_home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    return hf_home


def test_hub_source_through_huggingface_hub(hub_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = f"/acme/tiny/resolve/{'v1'}/weights/model.gguf"
    with artifact_server({path: PAYLOAD}) as served:
        monkeypatch.setenv("HF_ENDPOINT", served.url)
        source = HuggingFaceSource(
            kind="hf", repo="acme/tiny", filename="weights/model.gguf", revision="v1", sha256=DIGEST
        )
        manifest = manifest_for(source)
        store = ModelStore(tmp_path / "cache")
        placed = store.ensure(manifest)
        assert placed.read_bytes() == PAYLOAD and placed.name == "model.gguf"
        assert served.count("GET", path) == 1
        auth = [{k.lower(): v for k, v in h.items()}.get("authorization") for _, p, h in served.requests if p == path]
        assert auth and all(a == "Bearer hf_test_token" for a in auth), "HF_TOKEN is sent"
        assert list((hub_env / "hub" / "models--acme--tiny" / "blobs").iterdir()), "the Hub cache under HF_HOME"
        assert not leftovers(tmp_path)

        before = len(served.requests)
        assert store.ensure(manifest) == placed
        assert len(served.requests) == before, "a second pull asks the mirror nothing"

        # Offline with a fresh model cache: served from the Hub cache, without a request.
        offline = ModelStore(tmp_path / "other", offline=True).ensure(manifest)
        assert offline.read_bytes() == PAYLOAD and served.count("GET", path) == served.count("HEAD", path) == 1

        with placed.open("r+b") as handle:
            handle.write(b"XXXX")
        with pytest.raises(ArtifactError) as info:
            store.ensure(manifest)
        assert str(placed) in str(info.value) and DIGEST in str(info.value)


def test_hub_offline_without_cache_fails_clearly(
    hub_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with artifact_server({}) as served:
        monkeypatch.setenv("HF_ENDPOINT", served.url)
        manifest = manifest_for(HuggingFaceSource(kind="hf", repo="acme/tiny", filename="m.gguf"))
        with pytest.raises(ArtifactError, match=re.escape("offline mode: hf://acme/tiny/m.gguf@main")):
            ModelStore(tmp_path, offline=True).ensure(manifest)
        assert served.requests == []


def test_hub_file_without_manifest_is_synthesized_from_its_header(
    hub_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gguf

    model = tmp_path / "chat.gguf"
    writer = gguf.GGUFWriter(str(model), "llama")
    writer.add_context_length(2048)
    writer.add_chat_template("{{ messages }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with artifact_server({"/acme/chat/resolve/main/chat.gguf": model.read_bytes()}) as served:
        monkeypatch.setenv("HF_ENDPOINT", served.url)
        resolved = resolve(lookup("hf://acme/chat/chat.gguf"), ModelStore(tmp_path / "cache"), hardware=probe())
    assert (resolved.name, resolved.task, resolved.manifest.context_length) == ("acme/chat/chat", "chat", 2048)
    assert resolved.manifest.architecture == "llama" and resolved.profile.engine == "llamacpp"
    assert resolved.path.read_bytes() == model.read_bytes()


def test_two_concurrent_pulls_leave_one_good_file(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    with artifact_server({"/slow.gguf": PAYLOAD}, delay=0.02) as served:
        (catalog / "slow.yaml").write_text(
            "id: slow\ntask: completion\nprofiles:\n"
            "  - id: llamacpp-cpu\n    engine: llamacpp\n"
            f"    source: {{kind: http, url: '{served.url}/slow.gguf', sha256: {DIGEST}}}\n"
        )
        command = [sys.executable, "-m", "microserve", "pull", "slow"]
        flags = ["--catalog-dir", str(catalog), "--cache-dir", str(tmp_path / "cache")]
        pulls = [
            subprocess.Popen([*command, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        results = [p.communicate(timeout=120) for p in pulls]
    assert [p.returncode for p in pulls] == [0, 0], results
    folder = tmp_path / "cache" / "models" / "slow" / "llamacpp-cpu"
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "slow.gguf", "slow.gguf.sha256"]
    assert sha256_file(folder / "slow.gguf") == DIGEST
    assert served.count("GET") == 1, "the second pull waited for the first and reused its verified file"
    assert all(DIGEST in out for out, _ in results)
