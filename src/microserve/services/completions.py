"""Legacy text completions: prompt(s) → tokens → engine → ``text_completion`` responses and chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from microserve.engines.base import GenerationDelta, GenerationRequest
from microserve.errors import InvalidRequest
from microserve.protocol.common import Usage
from microserve.protocol.completions import Completion, CompletionChoice, CompletionRequest
from microserve.services.chat import usage_of
from microserve.services.fanout import interleave
from microserve.services.limits import RequestLimits
from microserve.services.params import resolve_max_tokens, sampling_params, stop_strings
from microserve.services.registry import ModelRegistry, ServedModel


@dataclass(slots=True)
class PreparedCompletion:
    """A validated completions request: one engine sequence per prompt."""

    id: str
    created: int
    model: ServedModel
    prompts: list[str]
    generations: list[GenerationRequest]
    echo: bool
    include_usage: bool


def _total(usages: list[Usage]) -> Usage:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages if u.prompt_tokens_details)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details={"cached_tokens": cached},  # type: ignore[arg-type]
    )


class CompletionService:
    """Serves ``/v1/completions``."""

    def __init__(self, registry: ModelRegistry, limits: RequestLimits | None = None) -> None:
        self._registry = registry
        self._limits = limits or RequestLimits()

    def prepare(self, request: CompletionRequest) -> PreparedCompletion:
        """Tokenize and validate every prompt; raises a ServiceError for anything the client must fix."""
        self._limits.check(request, requested_tokens=request.max_tokens)
        model = self._registry.get(request.model)
        engine = model.engine
        info = engine.info
        prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
        if not prompts:
            raise InvalidRequest("`prompt` must not be an empty list", param="prompt")
        stops = stop_strings(request.stop, self._limits.max_stop_sequences)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        generations = []
        for i, text in enumerate(prompts):
            tokens = engine.tokenize(text, add_special=True)
            requested = request.max_tokens
            if requested is None and info.context_length - len(tokens) >= 1:
                requested = self._limits.default_max_tokens(info.context_length - len(tokens))
            max_tokens = resolve_max_tokens(requested, len(tokens), info.context_length)
            generations.append(
                GenerationRequest(
                    request_id=f"{request_id}-{i}",
                    prompt_tokens=tokens,
                    params=sampling_params(request, max_tokens),
                    stop=stops,
                )
            )
        return PreparedCompletion(
            id=request_id,
            created=int(time.time()),
            model=model,
            prompts=prompts,
            generations=generations,
            echo=request.echo,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
        )

    def _streams(self, prepared: PreparedCompletion) -> list[AsyncIterator[GenerationDelta]]:
        engine = prepared.model.engine
        return [engine.generate(g) for g in prepared.generations]

    async def complete(self, prepared: PreparedCompletion) -> Completion:
        """Run every prompt to the end; one choice per prompt."""
        n = len(prepared.generations)
        texts = [prepared.prompts[i] if prepared.echo else "" for i in range(n)]
        last: list[GenerationDelta | None] = [None] * n
        async for index, delta in interleave(self._streams(prepared)):
            texts[index] += delta.text
            last[index] = delta
        return Completion(
            id=prepared.id,
            created=prepared.created,
            model=prepared.model.name,
            choices=[
                CompletionChoice(index=i, text=texts[i], finish_reason=d.finish_reason if d else "stop")
                for i, d in enumerate(last)
            ],
            usage=_total([usage_of(d, len(g.prompt_tokens)) for d, g in zip(last, prepared.generations, strict=True)]),
        )

    async def stream(self, prepared: PreparedCompletion) -> AsyncIterator[Completion]:
        """Chunks per prompt index; the echoed prompt comes first, usage last if asked."""

        def chunk(index: int, text: str, finish: str | None) -> Completion:
            return Completion(
                id=prepared.id,
                created=prepared.created,
                model=prepared.model.name,
                choices=[CompletionChoice(index=index, text=text, finish_reason=finish)],  # type: ignore[arg-type]
            )

        if prepared.echo:
            for i, prompt in enumerate(prepared.prompts):
                yield chunk(i, prompt, None)
        last: list[GenerationDelta | None] = [None] * len(prepared.generations)
        async for index, delta in interleave(self._streams(prepared)):
            last[index] = delta
            if delta.text or delta.finish_reason:
                yield chunk(index, delta.text, delta.finish_reason)
        if prepared.include_usage:
            usage = _total([usage_of(d, len(g.prompt_tokens)) for d, g in zip(last, prepared.generations, strict=True)])
            yield Completion(
                id=prepared.id, created=prepared.created, model=prepared.model.name, choices=[], usage=usage
            )
