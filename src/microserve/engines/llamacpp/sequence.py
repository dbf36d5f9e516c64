"""Per-request text state: incremental UTF-8 detokenizing and stop-string matching across token boundaries.

This runs on the request's own coroutine, not on the engine thread, so the engine thread only decodes and
samples.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence


class StopMatcher:
    """Holds back text that could still become a stop string, so a stop string never reaches the client."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None  # the stop string that was found

    def push(self, text: str) -> tuple[str, bool]:
        """Feed new text; return the text safe to emit and whether a stop string was found."""
        if not self._stops:
            return text, False
        buffer = self._held + text
        found = [(i, stop) for stop in self._stops if (i := buffer.find(stop)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda item: item[0])
            self._held = ""
            return buffer[:cut], True
        keep = self._longest_partial(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    @property
    def holding(self) -> bool:
        """Whether some text is held back as a possible start of a stop string."""
        return bool(self._held)

    def flush(self) -> str:
        """The held-back text, at the end of a sequence that did not hit a stop string."""
        held, self._held = self._held, ""
        return held

    def _longest_partial(self, buffer: str) -> int:
        # The longest suffix of buffer that is a proper prefix of some stop string.
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best


class TextAssembler:
    """Turns sampled token ids into text, never splitting a multi-byte UTF-8 character, and applies stops."""

    def __init__(self, piece: Callable[[int], bytes], stops: Sequence[str]) -> None:
        self._piece = piece
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(stops)

    @property
    def holding(self) -> bool:
        """Whether text is held back that may yet turn out to start a stop string."""
        return self._stops.holding

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self._stops.matched

    def push(self, token: int) -> tuple[str, bool]:
        """Text to emit after ``token``, and whether a stop string ended the sequence."""
        return self._stops.push(self._utf8.decode(self._piece(token)))

    def finish(self) -> str:
        """Whatever is still buffered when the sequence ends without a stop string."""
        tail, _ = self._stops.push(self._utf8.decode(b"", final=True))
        return tail + self._stops.flush()
