"""Chat completions: messages → template → tokens → engine → OpenAI responses and chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from microserve.engines.base import GenerationDelta, GenerationRequest
from microserve.protocol.chat import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
)
from microserve.protocol.common import PromptTokensDetails, Usage
from microserve.services.limits import RequestLimits
from microserve.services.params import resolve_max_tokens, sampling_params, stop_strings
from microserve.services.registry import ModelRegistry, ServedModel


def usage_of(delta: GenerationDelta | None, prompt_tokens: int) -> Usage:
    """OpenAI usage from the last delta of a sequence."""
    completion = delta.completion_tokens if delta else 0
    cached = delta.cached_tokens if delta else 0
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


@dataclass(slots=True)
class PreparedChat:
    """A validated request, ready for the engine: everything that can fail with a 4xx has been checked."""

    id: str
    created: int
    model: ServedModel
    generation: GenerationRequest
    include_usage: bool


class ChatService:
    """Serves ``/v1/chat/completions`` for every chat-capable model in the registry."""

    def __init__(self, registry: ModelRegistry, limits: RequestLimits | None = None) -> None:
        self._registry = registry
        self._limits = limits or RequestLimits()

    def prepare(self, request: ChatCompletionRequest) -> PreparedChat:
        """Render, tokenize and validate; raises a ServiceError for anything the client must fix."""
        requested = request.max_completion_tokens or request.max_tokens
        self._limits.check(request, messages=len(request.messages), requested_tokens=requested)
        model = self._registry.get(request.model)
        engine = model.engine
        template = model.template
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages
        ]
        prompt_text = template.render(messages)
        info = engine.info
        add_bos = info.add_bos and not (info.bos_token and prompt_text.startswith(info.bos_token))
        prompt = engine.tokenize(prompt_text, add_special=add_bos)
        room = info.context_length - len(prompt)
        if requested is None and room >= 1:
            requested = self._limits.default_max_tokens(room)
        max_tokens = resolve_max_tokens(requested, len(prompt), info.context_length)
        stops = list(stop_strings(request.stop, self._limits.max_stop_sequences))
        stop_ids: tuple[int, ...] = ()
        if template.end_of_turn:
            stop_ids = tuple(engine.token_ids(template.end_of_turn))
            if not stop_ids:
                stops.append(template.end_of_turn)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        return PreparedChat(
            id=request_id,
            created=int(time.time()),
            model=model,
            generation=GenerationRequest(
                request_id=request_id,
                prompt_tokens=prompt,
                params=sampling_params(request, max_tokens),
                stop=tuple(stops),
                stop_token_ids=stop_ids,
            ),
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
        )

    async def complete(self, prepared: PreparedChat) -> ChatCompletion:
        """Run to the end and return one ``chat.completion``."""
        parts: list[str] = []
        last: GenerationDelta | None = None
        async for delta in prepared.model.engine.generate(prepared.generation):
            parts.append(delta.text)
            last = delta
        return ChatCompletion(
            id=prepared.id,
            created=prepared.created,
            model=prepared.model.name,
            choices=[
                ChatChoice(
                    index=0,
                    message=AssistantMessage(content="".join(parts)),
                    finish_reason=last.finish_reason if last else "stop",
                )
            ],
            usage=usage_of(last, len(prepared.generation.prompt_tokens)),
        )

    async def stream(self, prepared: PreparedChat) -> AsyncIterator[ChatCompletionChunk]:
        """Chunks as OpenAI streams them: role first, content, finish_reason on the last, then usage if asked."""

        def chunk(delta: ChatDelta, finish: str | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=prepared.id,
                created=prepared.created,
                model=prepared.model.name,
                choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=finish)],  # type: ignore[arg-type]
            )

        yield chunk(ChatDelta(role="assistant", content=""))
        last: GenerationDelta | None = None
        async for delta in prepared.model.engine.generate(prepared.generation):
            last = delta
            if delta.text or delta.finish_reason:
                yield chunk(ChatDelta(content=delta.text or None), delta.finish_reason)
        if prepared.include_usage:
            yield ChatCompletionChunk(
                id=prepared.id,
                created=prepared.created,
                model=prepared.model.name,
                choices=[],
                usage=usage_of(last, len(prepared.generation.prompt_tokens)),
            )
