"""Chat prompts given as segments, tokenized so that only the template's markup can become control tokens.

llama.cpp's tokenizer either parses special-token text everywhere in a string or nowhere. A chat prompt needs
both: the template's ``<|im_start|>`` must be the control token, a client's typed ``<|im_start|>`` must stay
characters. Given the prompt as markup and content segments:

* when no control-token text touches a content segment (the usual case) the whole prompt is tokenized in one call
  with special tokens parsed, exactly as before;
* otherwise the prompt is cut at the markup's own control tokens, and each stretch between them (template text and
  content alike) is tokenized as plain text. llama.cpp cuts a string at its special tokens the same way before it
  tokenizes the pieces, so the result is what it would give if the content's look-alikes were not special.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence

from microserve.engines.base import PromptSegment

Tokenize = Callable[[str, bool], list[int]]  # (text, parse_special) -> ids, without BOS


class ControlTexts:
    """The texts of a vocabulary's control tokens (those llama.cpp parses only when asked to), and where they
    occur in a string."""

    def __init__(self, texts: Mapping[str, int]) -> None:
        self._ids = {text: token for text, token in texts.items() if text}
        self._lengths = sorted({len(text) for text in self._ids}, reverse=True)
        firsts = "".join(sorted({text[0] for text in self._ids}))
        self._starts = re.compile(f"[{re.escape(firsts)}]") if firsts else None

    def __len__(self) -> int:
        return len(self._ids)

    def find(self, text: str, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int]]:
        """Non-overlapping occurrences ``(start, end, token id)`` in ``text[start:end]``, left to right, the
        longest text at each position first."""
        if self._starts is None:
            return
        end = len(text) if end is None else end
        pos = start
        while True:
            match = self._starts.search(text, pos, end)
            if match is None:
                return
            at = match.start()
            for length in self._lengths:
                stop = at + length
                if stop <= end and text[at:stop] in self._ids:
                    yield at, stop, self._ids[text[at:stop]]
                    pos = stop
                    break
            else:
                pos = at + 1

    def first_in(self, text: str) -> str | None:
        """The first control-token text in ``text``, if any."""
        for start, stop, _ in self.find(text):
            return text[start:stop]
        return None

    def touches(self, text: str, ranges: Sequence[tuple[int, int]]) -> bool:
        """Whether any occurrence of a control-token text in ``text`` (overlapping ones included) shares a
        character with one of ``ranges``."""
        if self._starts is None or not ranges:
            return False
        longest = self._lengths[0]
        for lo, hi in ranges:
            pos = max(0, lo - longest + 1)
            while True:
                match = self._starts.search(text, pos, hi)
                if match is None:
                    break
                at = match.start()
                for length in self._lengths:
                    if at + length > lo and text[at : at + length] in self._ids:
                        return True
                pos = at + 1
        return False


def encode_segments(
    segments: Sequence[PromptSegment],
    controls: ControlTexts,
    tokenize: Tokenize,
    *,
    bos: int | None,
    bos_text: str,
) -> list[int]:
    """Token ids of the prompt ``segments``; ``bos`` is prepended (when given) unless the prompt starts with its
    text."""
    text = "".join(segment.text for segment in segments)
    ranges: list[tuple[int, int]] = []
    offset = 0
    for segment in segments:
        if not segment.markup and segment.text:
            ranges.append((offset, offset + len(segment.text)))
        offset += len(segment.text)
    head = [bos] if bos is not None and not (bos_text and text.startswith(bos_text)) else []
    if not controls.touches(text, ranges):
        return head + tokenize(text, True)
    ids = list(head)
    stretch: list[str] = []

    def flush() -> None:
        if stretch:
            ids.extend(tokenize("".join(stretch), False))
            stretch.clear()

    for segment in segments:
        if not segment.markup:
            stretch.append(segment.text)
            continue
        pos = 0
        for start, stop, token in controls.find(segment.text):
            stretch.append(segment.text[pos:start])
            flush()
            ids.append(token)
            pos = stop
        stretch.append(segment.text[pos:])
    flush()
    return ids
