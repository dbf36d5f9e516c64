"""derive_gguf on a tiny GGUF: llama.cpp's own quantizer writes another precision of the same weights."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from tiny_gguf import write_tiny_llama

from microserve.catalog.gguf_header import read_header
from microserve.catalog.store import sha256_file
from microserve.engines.llamacpp.derive import derive_gguf
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
