"""Per-request limits an operator sets: messages, stop strings, ``n`` and completion tokens."""

from __future__ import annotations

from dataclasses import dataclass

from microserve.errors import InvalidRequest
from microserve.protocol.common import SamplingFields


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds every generation request must respect; each violation is a 400 naming the field."""

    max_tokens: int | None = None
    max_messages: int = 1024
    max_stop_sequences: int = 4
    max_stop_length: int = 256
    max_n: int = 16

    def check(self, request: SamplingFields, *, messages: int | None = None, requested_tokens: int | None) -> None:
        """Raise InvalidRequest for the first field over its limit."""
        if messages is not None and messages > self.max_messages:
            raise InvalidRequest(
                f"`messages` has {messages} entries; at most {self.max_messages} are allowed", param="messages"
            )
        if request.n > self.max_n:
            raise InvalidRequest(f"`n` is {request.n}; at most {self.max_n} is allowed", param="n")
        if self.max_tokens is not None and requested_tokens is not None and requested_tokens > self.max_tokens:
            raise InvalidRequest(
                f"`max_tokens` is {requested_tokens}; this server allows at most {self.max_tokens}",
                param="max_tokens",
            )
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stops) > self.max_stop_sequences:
            raise InvalidRequest(
                f"`stop` takes at most {self.max_stop_sequences} sequences, got {len(stops)}", param="stop"
            )
        for stop in stops:
            if len(stop) > self.max_stop_length:
                raise InvalidRequest(
                    f"a `stop` sequence has {len(stop)} characters; at most {self.max_stop_length} are allowed",
                    param="stop",
                )

    def default_max_tokens(self, room: int) -> int:
        """The completion budget when the request sets none: the context's room, capped by the limit."""
        return room if self.max_tokens is None else min(room, self.max_tokens)
