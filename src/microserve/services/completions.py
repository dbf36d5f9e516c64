"""Legacy text completions: prompt(s) → tokens → engine → ``text_completion`` responses and chunks.

Choice indices follow OpenAI: prompt ``p``'s ``j``-th choice has index ``p * n + j``. A prompt is text or token ids
(ids are checked against the vocabulary); ``echo`` with ``logprobs`` scores the prompt as well, one entry per prompt
token with the first null, and ``max_tokens`` 0 with ``echo`` scores it without generating (as lm-eval's
loglikelihood requests do).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from microserve.engines.base import GenerationDelta, GenerationRequest, TextEngine, TokenLogprob
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
    first_token: Callable[[int], str] | None = None
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(
        self, items: list[TokenLogprob] | list[TokenLogprob | None], prompt: list[int] | None = None
    ) -> CompletionLogprobs:
        """Append ``items``; return just their part, for a streamed chunk. A prompt's entries come with its ids,
        since its first token has no logprob (None) and is listed by id."""
        part = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for i, item in enumerate(items):
            text = item.token.decode("utf-8", errors="replace") if item is not None else ""
            if item is None and prompt is not None:
                text = self.first_token(prompt[i]) if self.first_token is not None else ""
            alternatives: dict[str, float] | None = None
            if item is not None:
                alternatives = {}
                for token, lp in item.top[: self.top]:
                    alternatives.setdefault(token.decode("utf-8", errors="replace"), lp)
            for target in (self, part):
                target.tokens.append(text)
                target.token_logprobs.append(item.logprob if item is not None else None)
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
        if wanted == 0 and not request.echo:
            raise InvalidRequest(
                "`max_tokens` 0 generates nothing: it is only accepted with `echo` (to score the prompt)",
                param="max_tokens",
            )
        # No prompt at all is OpenAI's default: the start of a document.
        prompts: list[str | list[int] | None] = [None] if request.prompt is None else list(prompt_items(request.prompt))
        if not prompts:
            raise InvalidRequest("`prompt` must not be an empty list", param="prompt")
        guide = await self._checked(model, self._guide(request))
        stops = self._stops(request)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        scored = request.echo and request.logprobs is not None
        generations = []
        texts = []
        for i, item in enumerate(prompts):
            if item is None:
                tokens = document_start(model)
                texts.append("")
            elif isinstance(item, list):
                tokens = checked_ids(item, info.vocab_size, i, len(prompts))
                texts.append(engine.detokenize(tokens) if request.echo else "")
            else:
                tokens = engine.encode_prompt(item)
                texts.append(item)
            generation = GenerationRequest(
                request_id=f"{request_id}-{i}",
                prompt_tokens=tokens,
                params=sampling_params(
                    request, self._budget(wanted, len(tokens), info.context_length), info.vocab_size
                ),
                stop=stops,
                guide=guide,
                logprobs=request.logprobs if wanted != 0 else None,
                n=request.n,
                adapter=model.adapter,
                prompt_logprobs=request.logprobs if scored else None,
            )
            engine.check_request(generation)
            generations.append(generation)
        return PreparedCompletion(
            id=request_id,
            created=int(time.time()),
            model=model,
            prompts=texts,
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
        engine = prepared.model.text_engine
        return [
            _LegacyLogprobs(offset=0, top=prepared.logprobs, first_token=_first_token(engine))
            for _ in range(len(prepared.prompts) * prepared.n)
        ]

    def _scores(
        self,
        prepared: PreparedCompletion,
        prompt_index: int,
        delta: GenerationDelta,
        trackers: list[_LegacyLogprobs | None],
    ) -> list[tuple[int, CompletionLogprobs]]:
        """The prompt's logprobs, once they arrive with its first delta, for each of its ``n`` choices."""
        if delta.prompt_logprobs is None:
            return []
        n = prepared.n
        ids = prepared.generations[prompt_index].prompt_tokens
        out = []
        for j in range(n):
            tracker = trackers[prompt_index * n + j]
            if tracker is not None:
                out.append((prompt_index * n + j, tracker.add(delta.prompt_logprobs, ids)))
        return out

    async def complete(self, prepared: PreparedCompletion) -> Completion:
        """Run every prompt to the end; ``n`` choices per prompt."""
        n = prepared.n
        total = len(prepared.generations) * n
        texts = [prepared.prompts[i // n] if prepared.echo else "" for i in range(total)]
        last: list[GenerationDelta | None] = [None] * total
        trackers = self._trackers(prepared)
        async for prompt_index, delta in interleave(self._streams(prepared)):
            index = prompt_index * n + delta.index
            self._scores(prepared, prompt_index, delta, trackers)
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
        scored = prepared.generations[0].prompt_logprobs is not None
        if prepared.echo and not scored:
            for i, prompt in enumerate(prepared.prompts):
                for j in range(n):
                    yield chunk(i * n + j, prompt, None)
        last: list[GenerationDelta | None] = [None] * (len(prepared.generations) * n)
        trackers = self._trackers(prepared)
        async for prompt_index, delta in interleave(self._streams(prepared)):
            index = prompt_index * n + delta.index
            # A scored prompt is echoed once its logprobs are in, with them.
            for choice, echoed in self._scores(prepared, prompt_index, delta, trackers):
                yield chunk(choice, prepared.prompts[prompt_index], None, echoed)
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


def prompt_items(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts a request holds: a string or one list of token ids is one prompt, else each item of the list."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def checked_ids(ids: list[int], vocab_size: int, index: int, count: int) -> list[int]:
    """A token-id prompt, once every id is in the vocabulary and it is not empty (else a 400 naming the prompt)."""
    param = "prompt" if count == 1 else f"prompt[{index}]"
    if not ids:
        raise InvalidRequest(f"`{param}` is an empty list of token ids", param=param)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"`{param}` holds token id {bad}, outside the vocabulary [0, {vocab_size})", param=param)
    return ids


def _first_token(engine: TextEngine) -> Callable[[int], str]:
    return lambda token: engine.detokenize([token])
