"""Legacy text completions: prompt(s) → tokens → engine → ``text_completion`` responses and chunks.

Choice indices follow OpenAI: prompt ``p``'s ``j``-th choice has index ``p * n + j``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from microserve.engines.base import GenerationDelta, GenerationRequest, TokenLogprob
from microserve.errors import InvalidRequest
from microserve.protocol.common import Usage
from microserve.protocol.completions import (
    DEFAULT_MAX_TOKENS,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from microserve.services.chat import usage_of_choices
from microserve.services.fanout import interleave
from microserve.services.generation import GenerationService, sampling_params
from microserve.services.models import ServedModel


@dataclass(slots=True)
class PreparedCompletion:
    """A validated completions request: one engine request (of ``n`` choices) per prompt."""

    id: str
    created: int
    model: ServedModel
    prompts: list[str]
    generations: list[GenerationRequest]
    echo: bool
    include_usage: bool
    n: int = 1
    logprobs: int | None = None


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


@dataclass(slots=True)
class _LegacyLogprobs:
    """Accumulates the legacy logprobs lists of one choice; offsets count characters from the choice's start."""

    offset: int
    top: int
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, items: list[TokenLogprob]) -> CompletionLogprobs:
        """Append ``items``; return just their part, for a streamed chunk."""
        part = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for item in items:
            text = item.token.decode("utf-8", errors="replace")
            alternatives: dict[str, float] = {}
            for token, lp in item.top[: self.top]:
                alternatives.setdefault(token.decode("utf-8", errors="replace"), lp)
            for target in (self, part):
                target.tokens.append(text)
                target.token_logprobs.append(item.logprob)
                target.top_logprobs.append(alternatives)
                target.text_offset.append(self.offset)
            self.offset += len(text)
        return part

    def shape(self) -> CompletionLogprobs:
        """The whole choice's logprobs."""
        return CompletionLogprobs(
            tokens=self.tokens,
            token_logprobs=self.token_logprobs,
            top_logprobs=self.top_logprobs,
            text_offset=self.text_offset,
        )


def document_start(model: ServedModel) -> list[int]:
    """The prompt of a request without one: the start of a document, as OpenAI's default prompt
    (``<|endoftext|>``) is: the model's BOS token, or its end-of-text token where it has no BOS."""
    engine = model.text_engine
    info = engine.info
    tokens = engine.encode_prompt("")
    for text in (info.bos_token, info.eos_token):
        if not tokens and text:
            tokens = engine.token_ids(text)
    if not tokens:
        raise InvalidRequest(f"`{model.name}` has no start-of-text token; send a `prompt`", param="prompt")
    return tokens


class CompletionService(GenerationService):
    """Serves ``/v1/completions``."""

    async def prepare(self, request: CompletionRequest) -> PreparedCompletion:
        """Tokenize and validate every prompt; raises a ServiceError for anything the client must fix."""
        # OpenAI's default of 16 completion tokens is not a request: an operator's lower limit caps it.
        explicit = "max_tokens" in request.model_fields_set
        model = self._model(request.model, request, requested=request.max_tokens if explicit else None)
        wanted = request.max_tokens if explicit else self._limits.default_max_tokens(DEFAULT_MAX_TOKENS)
        engine = model.text_engine
        info = engine.info
        if request.suffix:
            raise InvalidRequest("`suffix` (fill-in-the-middle) is not supported by this model", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise InvalidRequest("`best_of` other than `n` is not supported", param="best_of")
        if request.echo and request.logprobs is not None:
            raise InvalidRequest("`echo` with `logprobs` (prompt logprobs) is not supported", param="echo")
        if request.prompt is None:
            prompts = [""]
        else:
            prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
        if not prompts:
            raise InvalidRequest("`prompt` must not be an empty list", param="prompt")
        guide = await self._checked(model, self._guide(request))
        stops = self._stops(request)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        generations = []
        for i, text in enumerate(prompts):
            tokens = engine.encode_prompt(text) if request.prompt is not None else document_start(model)
            generation = GenerationRequest(
                request_id=f"{request_id}-{i}",
                prompt_tokens=tokens,
                params=sampling_params(
                    request, self._budget(wanted, len(tokens), info.context_length), info.vocab_size
                ),
                stop=stops,
                guide=guide,
                logprobs=request.logprobs,
                n=request.n,
                adapter=model.adapter,
            )
            engine.check_request(generation)
            generations.append(generation)
        return PreparedCompletion(
            id=request_id,
            created=int(time.time()),
            model=model,
            prompts=prompts,
            generations=generations,
            echo=request.echo,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
            n=request.n,
            logprobs=request.logprobs,
        )

    def _streams(self, prepared: PreparedCompletion) -> list[AsyncIterator[GenerationDelta]]:
        engine = prepared.model.text_engine
        return [engine.generate(g) for g in prepared.generations]

    def _usage(self, prepared: PreparedCompletion, last: list[GenerationDelta | None]) -> Usage:
        n = prepared.n
        return _total(
            [
                usage_of_choices(last[p * n : (p + 1) * n], len(g.prompt_tokens))
                for p, g in enumerate(prepared.generations)
            ]
        )

    def _trackers(self, prepared: PreparedCompletion) -> list[_LegacyLogprobs | None]:
        if prepared.logprobs is None:
            return [None] * (len(prepared.prompts) * prepared.n)
        return [_LegacyLogprobs(offset=0, top=prepared.logprobs) for _ in range(len(prepared.prompts) * prepared.n)]

    async def complete(self, prepared: PreparedCompletion) -> Completion:
        """Run every prompt to the end; ``n`` choices per prompt."""
        n = prepared.n
        total = len(prepared.generations) * n
        texts = [prepared.prompts[i // n] if prepared.echo else "" for i in range(total)]
        last: list[GenerationDelta | None] = [None] * total
        trackers = self._trackers(prepared)
        async for prompt_index, delta in interleave(self._streams(prepared)):
            index = prompt_index * n + delta.index
            texts[index] += delta.text
            last[index] = delta
            tracker = trackers[index]
            if tracker is not None and delta.logprobs:
                tracker.add(delta.logprobs)
        return Completion(
            id=prepared.id,
            created=prepared.created,
            model=prepared.model.name,
            choices=[
                CompletionChoice(
                    index=i,
                    text=texts[i],
                    logprobs=trackers[i].shape() if trackers[i] is not None else None,  # type: ignore[union-attr]
                    finish_reason=d.finish_reason if d else "stop",
                )
                for i, d in enumerate(last)
            ],
            usage=self._usage(prepared, last),
        )

    async def stream(self, prepared: PreparedCompletion) -> AsyncIterator[Completion]:
        """Chunks per choice index; the echoed prompt comes first, usage last if asked."""

        def chunk(index: int, text: str, finish: str | None, logprobs: CompletionLogprobs | None = None) -> Completion:
            return Completion(
                id=prepared.id,
                created=prepared.created,
                model=prepared.model.name,
                choices=[CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)],  # type: ignore[arg-type]
            )

        n = prepared.n
        if prepared.echo:
            for i, prompt in enumerate(prepared.prompts):
                for j in range(n):
                    yield chunk(i * n + j, prompt, None)
        last: list[GenerationDelta | None] = [None] * (len(prepared.generations) * n)
        trackers = self._trackers(prepared)
        async for prompt_index, delta in interleave(self._streams(prepared)):
            index = prompt_index * n + delta.index
            last[index] = delta
            tracker = trackers[index]
            part = tracker.add(delta.logprobs or []) if tracker is not None else None
            if delta.text or delta.finish_reason or (part is not None and part.tokens):
                yield chunk(index, delta.text, delta.finish_reason, part)
        if prepared.include_usage:
            yield Completion(
                id=prepared.id,
                created=prepared.created,
                model=prepared.model.name,
                choices=[],
                usage=self._usage(prepared, last),
            )
