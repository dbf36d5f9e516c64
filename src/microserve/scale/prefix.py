"""Prefix keys: a request's leading prompt, cut into blocks and hashed as a chain, per model and adapter.

Block ``i`` of a key is the hash of blocks ``0..i`` together (each hash folds in the one before it), so two prompts
share their first ``k`` block hashes exactly when they share their first ``k`` blocks. A router can then find the
longest prefix a replica has seen by looking the hashes up from the longest down, without storing any prompt.

The model and adapter are folded into the first block, so that the same text sent to two models (or to a base model
and one of its adapters, whose KV caches differ) never looks shared.

Keys are built from tokens where a caller has them (the simulator, an engine) and from the prompt's text where it
has not (an ingress in front of the replicas, which has no tokenizer): a replica's prefix cache is keyed by tokens,
and text that is equal up to a point tokenizes equally up to about that point, so text blocks stand in for token
blocks at about four characters a token.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# About 16 tokens of English text: small enough that one turn of a chat adds a few blocks, large enough that a long
# prompt stays a few hundred hashes.
DEFAULT_BLOCK_CHARS = 64
DEFAULT_BLOCK_TOKENS = 16
# The key covers the first this-many blocks; what lies beyond rarely changes the choice of replica.
DEFAULT_MAX_BLOCKS = 512


@dataclass(frozen=True, slots=True)
class PrefixKey:
    """The chained block hashes of a prompt's leading blocks; ``blocks[i]`` stands for blocks ``0..i``."""

    blocks: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.blocks)


def _chain(namespace: bytes, pieces: Iterable[bytes]) -> PrefixKey:
    previous = hashlib.blake2b(namespace, digest_size=8).digest()
    blocks = []
    for piece in pieces:
        previous = hashlib.blake2b(previous + piece, digest_size=8).digest()
        blocks.append(int.from_bytes(previous, "little"))
    return PrefixKey(tuple(blocks))


def _namespace(model: str, adapter: str | None) -> bytes:
    return json.dumps([model, adapter]).encode()


def key_from_tokens(
    model: str,
    tokens: Sequence[int],
    *,
    adapter: str | None = None,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    max_blocks: int = DEFAULT_MAX_BLOCKS,
) -> PrefixKey:
    """The key of a tokenized prompt: only whole blocks count (a partial last block is never cached alone)."""
    whole = min(len(tokens) // block_tokens, max_blocks)
    packed = array("q", tokens[: whole * block_tokens]).tobytes()
    step = block_tokens * 8
    return _chain(_namespace(model, adapter), (packed[i : i + step] for i in range(0, whole * step, step)))


def key_from_text(
    model: str,
    text: str,
    *,
    adapter: str | None = None,
    block_chars: int = DEFAULT_BLOCK_CHARS,
    max_blocks: int = DEFAULT_MAX_BLOCKS,
) -> PrefixKey:
    """The key of a prompt's text, in blocks of ``block_chars`` UTF-8 bytes."""
    data = text.encode()
    whole = min(len(data) // block_chars, max_blocks)
    return _chain(
        _namespace(model, adapter), (data[i : i + block_chars] for i in range(0, whole * block_chars, block_chars))
    )


def _content_text(content: Any) -> str:
    # OpenAI content is a string or a list of parts; only text parts shape the prompt's tokens here.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return ""


def rendered_text(body: Mapping[str, Any]) -> str | None:
    """A stand-in for the rendered prompt of a chat or completion body: what the template would lay out, in order.

    Chat messages become ``<role>\\n<content>\\n`` each (a template adds its own markers, but at the same places
    for the same messages, so equal message prefixes give equal text prefixes); a completion's prompt is its text.
    Tool definitions and the like come before the messages in most templates and are folded in first. None for a
    body that has neither (an embeddings request, a malformed body): such a request has no prefix to follow.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        head = json.dumps(body["tools"], sort_keys=True) + "\n" if body.get("tools") else ""
        parts = [head]
        for message in messages:
            if isinstance(message, Mapping):
                parts.append(f"{message.get('role', '')}\n{_content_text(message.get('content'))}\n")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt[0]  # a batch of prompts: the first decides, the rest go along
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return " ".join(str(t) for t in prompt)
    return None


def key_from_body(
    body: Mapping[str, Any],
    *,
    adapter_field: str = "adapter",
    block_chars: int = DEFAULT_BLOCK_CHARS,
    max_blocks: int = DEFAULT_MAX_BLOCKS,
) -> PrefixKey | None:
    """The key of an OpenAI chat or completion request body, or None when it has no prompt to key on.

    The model name is the namespace. An adapter, when the body names one in ``adapter_field`` (the base model's
    adapters are chosen by ``model`` in OpenAI's API, so usually the model name alone tells them apart), is folded
    in too.
    """
    model = body.get("model")
    text = rendered_text(body)
    if not isinstance(model, str) or text is None:
        return None
    adapter = body.get(adapter_field)
    return key_from_text(
        model,
        text,
        adapter=adapter if isinstance(adapter, str) else None,
        block_chars=block_chars,
        max_blocks=max_blocks,
    )
