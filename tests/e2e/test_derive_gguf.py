"""derive_gguf on a tiny GGUF: llama.cpp's own quantizer writes another precision of the same weights; the model store
makes a derived profile's file with it once, records its digest and checks it on every load."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from tiny_gguf import write_tiny_llama

from microserve.catalog.gguf_header import read_header
from microserve.catalog.manifest import Manifest
from microserve.catalog.store import ArtifactError, ModelStore, sha256_file
from microserve.engines.llamacpp.requantize import derive_gguf
from microserve.engines.registry import DerivationError


def weights(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF as float32, dequantized as llama.cpp stores it."""
    from gguf.quants import dequantize

    return {
        t.name: dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        for t in gguf.GGUFReader(str(path)).tensors
    }


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize(("ftype", "matrix_type"), [("Q8_0", "Q8_0"), ("F16", "F16"), ("BF16", "BF16")])
def test_derived_file_has_the_type_the_metadata_and_loads(tmp_path: Path, ftype: str, matrix_type: str) -> None:
    source = write_tiny_llama(tmp_path / "tiny.gguf")
    target = tmp_path / "out" / f"tiny.{ftype}.gguf"
    seen: list[tuple[int, int]] = []
    derive_gguf(source, target, ftype, threads=1, progress=lambda done, total: seen.append((done, total)))
    # Progress counts the tensors, from the first to all of them.
    count = len(gguf.GGUFReader(str(source)).tensors)
    assert seen[0] == (0, count) and seen[-1] == (count, count)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary file left behind
    types = tensor_types(target)
    assert types["blk.0.attn_q.weight"] == matrix_type and types["blk.0.ffn_down.weight"] == matrix_type
    assert types["blk.0.attn_norm.weight"] == "F32"  # llama.cpp keeps the norms in F32
    header = read_header(target)
    assert header.file_type == ftype and header.architecture == "llama"
    assert header.chat_template == read_header(source).chat_template  # the metadata travels along

    # The same weights, to the precision of the type.
    derived, original = weights(target), weights(source)
    assert derived.keys() == original.keys()
    tolerance = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2}[ftype]
    for name, values in original.items():
        assert np.allclose(derived[name], values, rtol=0, atol=tolerance * float(np.abs(values).max())), name

    from llama_cpp import Llama

    model = Llama(str(target), n_ctx=64, n_threads=1, verbose=False)  # and llama.cpp loads and runs it
    assert model("hello", max_tokens=2, temperature=0)["usage"]["prompt_tokens"] > 0


def test_requantizing_a_quantized_file_and_deriving_again_is_deterministic(tmp_path: Path) -> None:
    source = write_tiny_llama(tmp_path / "tiny.gguf")
    q8 = tmp_path / "tiny.Q8_0.gguf"
    derive_gguf(source, q8, "Q8_0", threads=1)
    # From a quantized file back to a wider one, as from the shipped Q4_1: allowed, and the same bytes each time.
    derive_gguf(q8, tmp_path / "a.F16.gguf", "F16", threads=1)
    derive_gguf(q8, tmp_path / "b.F16.gguf", "F16", threads=1)
    assert sha256_file(tmp_path / "a.F16.gguf") == sha256_file(tmp_path / "b.F16.gguf")
    assert tensor_types(tmp_path / "a.F16.gguf")["output.weight"] == "F16"


def test_bad_inputs_are_clear_errors_and_leave_nothing(tmp_path: Path) -> None:
    with pytest.raises(DerivationError, match="no such file"):
        derive_gguf(tmp_path / "absent.gguf", tmp_path / "out.gguf", "F16")
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model at all")
    with pytest.raises(DerivationError, match="not a GGUF"):
        derive_gguf(bogus, tmp_path / "out.gguf", "F16")
    with pytest.raises(DerivationError, match="cannot derive type `Q3_X`"):
        derive_gguf(write_tiny_llama(tmp_path / "tiny.gguf"), tmp_path / "out.gguf", "Q3_X")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes((tmp_path / "tiny.gguf").read_bytes()[:4096])
    with pytest.raises(DerivationError, match="could not derive"):
        derive_gguf(truncated, tmp_path / "out.gguf", "F16", threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bogus.gguf", "tiny.gguf", "truncated.gguf"]


def tiny_manifest(source: Path, sha256: str | None = None) -> Manifest:
    derived: dict[str, object] = {"kind": "derived", "profile": "small", "type": "F16", "file": "tiny.F16.gguf"}
    if sha256 is not None:
        derived["sha256"] = sha256
    return Manifest.model_validate(
        {
            "id": "tiny",
            "task": "chat",
            "profiles": [
                {"id": "wide", "engine": "llamacpp", "quantization": "F16", "source": derived},
                {"id": "small", "engine": "llamacpp", "source": {"kind": "local", "path": str(source)}},
            ],
        }
    )


def test_the_store_derives_once_records_the_digest_and_refuses_a_changed_file(tmp_path: Path) -> None:
    source = write_tiny_llama(tmp_path / "tiny.gguf")
    manifest = tiny_manifest(source)
    wide = manifest.profile("wide")
    assert wide is not None
    store = ModelStore(tmp_path / "cache", tty=False, threads=1)
    assert not store.is_cached(manifest, wide)
    made = store.ensure(manifest, wide)
    assert made == store.path_for(manifest, wide) and store.is_cached(manifest, wide)
    assert made.with_name(made.name + ".sha256").read_text() == f"{sha256_file(made)}  {made.name}\n"
    assert sorted(p.name for p in made.parent.iterdir()) == [".lock", made.name, made.name + ".sha256"]
    assert tensor_types(made)["blk.0.attn_q.weight"] == "F16"
    stamp = made.stat().st_mtime_ns
    assert store.ensure(manifest, wide) == made and made.stat().st_mtime_ns == stamp  # made once
    # A file changed after it was made is refused with both digests, never served.
    with made.open("r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x01")
    with pytest.raises(ArtifactError, match=r"is corrupt: sha256 .* expected .*; delete it to derive it again"):
        store.ensure(manifest, wide)
    # A pinned digest that the made file does not have places nothing.
    made.unlink()
    pinned = tiny_manifest(source, sha256="0" * 64)
    with pytest.raises(ArtifactError, match=r"expected 0{64}; nothing was placed"):
        store.ensure(pinned, pinned.profiles[0])
    assert not made.exists()


def test_the_store_says_which_parent_is_missing(tmp_path: Path) -> None:
    manifest = tiny_manifest(tmp_path / "absent.gguf")
    store = ModelStore(tmp_path / "cache", tty=False)
    with pytest.raises(ArtifactError, match="wide of tiny is made from small: model file not found"):
        store.ensure(manifest, manifest.profiles[0])
