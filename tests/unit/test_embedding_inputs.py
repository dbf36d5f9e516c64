"""Truncation, dimension shortening and base64 encoding of embeddings."""

from __future__ import annotations

import base64
import math
import struct

import pytest

from microserve.engines.base import EncoderInfo
from microserve.errors import InvalidRequest
from microserve.services.embeddings import encode_base64, fit, shorten

INFO = EncoderInfo(
    id="m",
    kind="embedding",
    context_length=6,
    vocab_size=100,
    dimensions=4,
    backend="t",
    path="/",
    single_prefix=(1,),
    single_suffix=(2,),
    pair_overhead=3,
)


def test_fit_keeps_short_inputs_and_unwraps_wrapped_ones() -> None:
    assert fit([10, 11], INFO, "NONE", "x", "input") == [10, 11]
    assert fit([1, 10, 11, 2], INFO, "NONE", "x", "input") == [10, 11]  # already wrapped: the engine wraps again


def test_fit_truncates_each_side_or_refuses_naming_the_limit() -> None:
    ids = [10, 11, 12, 13, 14, 15]
    assert fit(ids, INFO, "END", "x", "input") == [10, 11, 12, 13]
    assert fit(ids, INFO, "START", "x", "input") == [12, 13, 14, 15]
    with pytest.raises(InvalidRequest) as info:
        fit(ids, INFO, "NONE", "input 3", "input")
    assert "limit of 6 tokens" in info.value.message and "input 3 has 8 tokens" in info.value.message


def test_shorten_renormalises() -> None:
    v = [0.5, 0.5, 0.5, 0.5]
    short = shorten(v, 2)
    assert len(short) == 2 and math.isclose(math.hypot(*short), 1.0)
    assert shorten(v, None) == v and shorten(v, 4) == v


def test_base64_is_little_endian_float32() -> None:
    raw = base64.b64decode(encode_base64([1.0, -2.5]))
    assert struct.unpack("<2f", raw) == (1.0, -2.5)
