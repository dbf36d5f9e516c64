"""Turning request fields into engine parameters, with the checks that need the model."""

from __future__ import annotations

from microserve.engines.base import SamplingParams
from microserve.errors import InvalidRequest
from microserve.protocol.common import SamplingFields

MAX_STOP_SEQUENCES = 4


def stop_strings(stop: str | list[str] | None, limit: int = MAX_STOP_SEQUENCES) -> tuple[str, ...]:
    """The request's stop strings as a tuple; empty strings are dropped, more than ``limit`` is an error."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > limit:
        raise InvalidRequest(f"`stop` takes at most {limit} sequences, got {len(items)}", param="stop")
    return tuple(s for s in items if s)


def resolve_max_tokens(requested: int | None, prompt_tokens: int, context_length: int) -> int:
    """The completion budget: as requested if it fits the context, else a 400 that states both numbers."""
    room = context_length - prompt_tokens
    if requested is None:
        if room < 1:
            raise InvalidRequest(
                f"This model's maximum context length is {context_length} tokens, but the prompt has "
                f"{prompt_tokens} tokens, leaving no room for a completion.",
                param="messages",
                code="context_length_exceeded",
            )
        return room
    if prompt_tokens + requested > context_length:
        raise InvalidRequest(
            f"This model's maximum context length is {context_length} tokens, but {prompt_tokens} prompt "
            f"tokens plus {requested} completion tokens (max_tokens) were requested.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def sampling_params(fields: SamplingFields, max_tokens: int) -> SamplingParams:
    """Engine sampling parameters from the request; unset fields take OpenAI's defaults."""
    if fields.n != 1:
        raise InvalidRequest("only n=1 is supported", param="n")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if fields.temperature is None else fields.temperature,
        top_p=1.0 if fields.top_p is None else fields.top_p,
        top_k=max(fields.top_k or 0, 0),
        min_p=fields.min_p or 0.0,
        seed=fields.seed,
        presence_penalty=fields.presence_penalty or 0.0,
        frequency_penalty=fields.frequency_penalty or 0.0,
        repetition_penalty=fields.repetition_penalty or 1.0,
        ignore_eos=fields.ignore_eos,
    )
