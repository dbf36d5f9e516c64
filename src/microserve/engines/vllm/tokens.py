"""The bytes each token stands for in generated text, from a Hugging Face fast tokenizer.

Logprobs report every token's bytes, and the engine lines tokens up with the text it emitted (to drop the tokens
of a stop string). vLLM's own per-token strings are decoded one token at a time and lose bytes of characters
split across tokens, so the bytes are read off the vocabulary instead: byte-level BPE vocabularies (GPT-2, SmolLM2,
Llama 3) map each character of a token to one byte; SentencePiece-style ones spell a space as ``▁`` and raw bytes
as ``<0xNN>``. Special tokens render as nothing, as they do in the text (``skip_special_tokens``).
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable-character table, character to byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _uses(node: Any, kind: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == kind or any(_uses(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_uses(v, kind) for v in node)
    return False


class TokenBytes:
    """Token id -> bytes, memoised (a vocabulary lookup per token, built lazily)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        self._byte_level = _uses(spec.get("decoder"), "ByteLevel")
        self._special = frozenset(int(t) for t in tokenizer.all_special_ids)
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._bytes(token_id)
            self._cache[token_id] = cached
        return cached

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._special:
            return b""
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            table = _byte_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
            return piece.encode("utf-8")  # an added token, stored as plain text
        match = _BYTE_TOKEN.match(piece)
        if match:
            return bytes([int(match[1], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")
