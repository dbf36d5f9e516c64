"""Chat completions: messages → template → tokens → engine → OpenAI responses and chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from microserve.engines.base import (
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    Guide,
    TextEngine,
    TokenLogprob,
)
from microserve.errors import InvalidRequest
from microserve.protocol.chat import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    FunctionCall,
    FunctionCallDelta,
    TokenLogprobEntry,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
)
from microserve.protocol.common import FinishReason as WireFinish
from microserve.protocol.common import PromptTokensDetails, Usage
from microserve.services.chat_template import ChatTemplate
from microserve.services.generation import GenerationService, sampling_params
from microserve.services.limits import RequestLimits
from microserve.services.models import ModelTable, ServedModel
from microserve.services.tools import (
    CallArguments,
    CallStart,
    ParseEvent,
    TextOut,
    ToolCallParser,
    ToolPlan,
    native_tools,
    plan_tools,
    template_messages,
)


def usage_of_choices(last: Sequence[GenerationDelta | None], prompt_tokens: int) -> Usage:
    """Usage of ``n`` choices of one prompt: the prompt counts once, every choice's completion counts."""
    completion = sum(d.completion_tokens for d in last if d)
    cached = last[0].cached_tokens if last and last[0] else 0
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def logprob_entries(items: list[TokenLogprob], top: int) -> list[TokenLogprobEntry]:
    """Chat's logprobs content: token text, logprob, UTF-8 bytes and the ``top`` alternatives."""
    return [
        TokenLogprobEntry(
            token=item.token.decode("utf-8", errors="replace"),
            logprob=item.logprob,
            bytes=list(item.token),
            top_logprobs=[
                TopLogprob(token=t.decode("utf-8", errors="replace"), logprob=lp, bytes=list(t))
                for t, lp in item.top[:top]
            ],
        )
        for item in items
    ]


def _response_format_guide(request: ChatCompletionRequest) -> Guide | None:
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        if fmt.schema_ is not None:
            return Guide("json", fmt.schema_, "response_format.schema")
        return Guide("json", {"type": "object"}, "response_format")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidRequest(
            "response_format of type json_schema needs `json_schema.schema`", param="response_format.json_schema"
        )
    return Guide("json", fmt.json_schema.schema_, "response_format.json_schema.schema")


def refuse_media(request: ChatCompletionRequest, model: str) -> None:
    """A 400 naming the first content part that is not text: the served models take text only."""
    for i, message in enumerate(request.messages):
        media = message.media()
        if media is not None:
            j, kind = media
            what = (
                "image" if "image" in kind else "audio" if "audio" in kind else "video" if "video" in kind else "file"
            )
            raise InvalidRequest(
                f"`messages[{i}].content[{j}]` is an `{kind}` part, but `{model}` takes text only: {what} input is "
                "not supported",
                param=f"messages[{i}].content[{j}]",
                code="unsupported_content",
            )


@dataclass(slots=True)
class PreparedChat:
    """A validated request, ready for the engine: everything that can fail with a 4xx has been checked."""

    id: str
    created: int
    model: ServedModel
    generation: GenerationRequest
    include_usage: bool
    tools: ToolPlan = field(default_factory=lambda: ToolPlan("none"))
    top_logprobs: int | None = None
    # Choice index -> the stop string that ended it, filled in as the choices finish.
    stopped_by: dict[int, str] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """How many choices the request asked for."""
        return self.generation.n


def _finish(reason: FinishReason | None, parser: ToolCallParser | None) -> WireFinish | None:
    if reason == "stop" and parser is not None and parser.calls:
        return "tool_calls"
    return reason


def encode_chat(
    engine: TextEngine,
    template: ChatTemplate,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    *,
    content_special_tokens: bool = False,
) -> list[int]:
    """The chat prompt's token ids, control tokens from the template's markup only: a client who types
    ``<|im_end|>\n<|im_start|>system`` gets those characters, not a system turn of its own. With
    ``content_special_tokens`` (trusted clients) the rendered text is tokenized whole, special tokens parsed."""
    if content_special_tokens:
        return engine.encode_prompt(template.render(messages, tools=tools))
    rendered = template.render_segments(messages, tools=tools)
    if rendered.segments is not None:
        return engine.encode_segments(rendered.segments)
    # The template rewrote client text, so where it sits is unknown: parsing the prompt whole is safe only if no
    # client string holds special-token text.
    for text in rendered.client_text:
        if engine.tokenize(text, add_special=False, parse_special=True) != engine.tokenize(
            text, add_special=False, parse_special=False
        ):
            raise InvalidRequest(
                "a message holds special-token text, and this model's chat template rewrites message text in a way "
                "that keeps it from being told apart from the template's own markup; remove the special-token text",
                param="messages",
                code="special_tokens_in_content",
            )
    return engine.encode_prompt(rendered.text)


class ChatService(GenerationService):
    """Serves ``/v1/chat/completions`` for every chat-capable model in the table."""

    def __init__(
        self, models: ModelTable, limits: RequestLimits | None = None, *, content_special_tokens: bool = False
    ) -> None:
        super().__init__(models, limits)
        self._content_special_tokens = content_special_tokens

    async def prepare(self, request: ChatCompletionRequest) -> PreparedChat:
        """Render, tokenize, check the output constraint; raises a ServiceError for anything the client must fix."""
        requested = request.max_completion_tokens or request.max_tokens
        model = self._model(request.model, request, messages=len(request.messages), requested=requested)
        engine = model.text_engine
        template = model.template
        refuse_media(request, model.name)
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequest("`top_logprobs` requires `logprobs` to be true", param="top_logprobs")
        plan = plan_tools(request.tools, request.tool_choice, request.parallel_tool_calls)
        guide = self._guide(request, _response_format_guide(request))
        if guide is not None and plan.active:
            raise InvalidRequest(
                f"`{guide.param}` cannot be combined with tool calls; set tool_choice to none", param=guide.param
            )
        guide = await self._checked(model, guide or plan.guide)
        info = engine.info
        prompt = self._prompt_ids(model, request, plan)
        max_tokens = self._budget(requested, len(prompt), info.context_length)
        stops = list(self._stops(request))
        stop_ids: tuple[int, ...] = ()
        if template.end_of_turn:
            stop_ids = tuple(engine.token_ids(template.end_of_turn))
            if not stop_ids:
                stops.append(template.end_of_turn)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        top = (request.top_logprobs or 0) if request.logprobs else None
        generation = GenerationRequest(
            request_id=request_id,
            prompt_tokens=prompt,
            params=sampling_params(request, max_tokens, info.vocab_size),
            stop=tuple(stops),
            stop_token_ids=stop_ids,
            guide=guide,
            logprobs=top,
            n=request.n,
            adapter=model.adapter,
        )
        engine.check_request(generation)
        return PreparedChat(
            id=request_id,
            created=int(time.time()),
            model=model,
            generation=generation,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
            tools=plan,
            top_logprobs=top,
        )

    def prompt_tokens(self, request: ChatCompletionRequest) -> list[int]:
        """The prompt's token ids as ``prepare`` renders them, tools included, for counting: no budget, no guide."""
        model = self._model(request.model, request, messages=len(request.messages), requested=None)
        refuse_media(request, model.name)
        plan = plan_tools(request.tools, request.tool_choice, request.parallel_tool_calls)
        return self._prompt_ids(model, request, plan)

    def _prompt_ids(self, model: ServedModel, request: ChatCompletionRequest, plan: ToolPlan) -> list[int]:
        # The messages (and tools) through the model's chat template, control tokens from the markup only.
        template = model.template
        native = template.supports_tools
        messages = template_messages(request.messages, plan, native=native)
        tools = native_tools(plan) if native else None
        return encode_chat(
            model.text_engine, template, messages, tools, content_special_tokens=self._content_special_tokens
        )

    def _parser(self, prepared: PreparedChat) -> ToolCallParser | None:
        plan = prepared.tools
        return ToolCallParser(plan.names, parallel=plan.parallel) if plan.active else None

    async def complete(self, prepared: PreparedChat) -> ChatCompletion:
        """Run every choice to the end and return one ``chat.completion``."""
        n = prepared.n
        parts: list[list[str]] = [[] for _ in range(n)]
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        last: list[GenerationDelta | None] = [None] * n
        async for delta in prepared.model.text_engine.generate(prepared.generation):
            parts[delta.index].append(delta.text)
            logprobs[delta.index].extend(delta.logprobs or ())
            last[delta.index] = delta
            if delta.stop_string is not None:
                prepared.stopped_by[delta.index] = delta.stop_string
        choices = []
        for i in range(n):
            text = "".join(parts[i])
            parser = self._parser(prepared)
            message = AssistantMessage(content=text)
            if parser is not None:
                events = parser.feed(text) + parser.finish()
                content = "".join(e.text for e in events if isinstance(e, TextOut))
                calls = [
                    ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                    for c in parser.calls
                    if c.complete
                ]
                message = AssistantMessage(
                    content=content if content.strip() or not calls else None, tool_calls=calls or None
                )
            final = last[i]
            reason = final.finish_reason if final is not None else "stop"
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    logprobs=(
                        ChoiceLogprobs(content=logprob_entries(logprobs[i], prepared.top_logprobs))
                        if prepared.top_logprobs is not None
                        else None
                    ),
                    finish_reason=_finish(reason, parser),
                )
            )
        return ChatCompletion(
            id=prepared.id,
            created=prepared.created,
            model=prepared.model.name,
            choices=choices,
            usage=usage_of_choices(last, len(prepared.generation.prompt_tokens)),
        )

    async def stream(self, prepared: PreparedChat) -> AsyncIterator[ChatCompletionChunk]:
        """Chunks as OpenAI streams them: role first, then content or tool-call deltas, finish_reason last per
        choice, then usage if asked. A tool call's id and name come first, its arguments in pieces after."""

        def chunk(
            index: int, delta: ChatDelta, finish: str | None = None, logprobs: ChoiceLogprobs | None = None
        ) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=prepared.id,
                created=prepared.created,
                model=prepared.model.name,
                choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)],  # type: ignore[arg-type]
            )

        n = prepared.n
        top = prepared.top_logprobs
        parsers = [self._parser(prepared) for _ in range(n)]
        pending: list[list[TokenLogprob]] = [[] for _ in range(n)]

        def take_logprobs(index: int) -> ChoiceLogprobs | None:
            if top is None:
                return None
            items, pending[index] = pending[index], []
            return ChoiceLogprobs(content=logprob_entries(items, top))

        for i in range(n):
            yield chunk(i, ChatDelta(role="assistant", content=""))
        last: list[GenerationDelta | None] = [None] * n
        async for delta in prepared.model.text_engine.generate(prepared.generation):
            i = delta.index
            last[i] = delta
            pending[i].extend(delta.logprobs or ())
            if delta.stop_string is not None:
                prepared.stopped_by[i] = delta.stop_string
            parser = parsers[i]
            if parser is None:
                if delta.text or delta.finish_reason:
                    yield chunk(i, ChatDelta(content=delta.text or None), delta.finish_reason, take_logprobs(i))
                continue
            events = parser.feed(delta.text)
            if delta.finish_reason:
                events += parser.finish()
            for out in _tool_deltas(events):
                yield chunk(i, out, None, take_logprobs(i))
            if delta.finish_reason:
                yield chunk(i, ChatDelta(), _finish(delta.finish_reason, parser), take_logprobs(i))
        if prepared.include_usage:
            yield ChatCompletionChunk(
                id=prepared.id,
                created=prepared.created,
                model=prepared.model.name,
                choices=[],
                usage=usage_of_choices(last, len(prepared.generation.prompt_tokens)),
            )


def _tool_deltas(events: list[ParseEvent]) -> list[ChatDelta]:
    """Parser events as chat deltas, merging neighbours of the same kind (text, or one call's arguments)."""
    out: list[ChatDelta] = []
    for event in events:
        previous = out[-1] if out else None
        if isinstance(event, TextOut):
            if not event.text:
                continue
            if previous is not None and previous.content is not None and previous.tool_calls is None:
                previous.content += event.text
            else:
                out.append(ChatDelta(content=event.text))
        elif isinstance(event, CallStart):
            out.append(
                ChatDelta(
                    tool_calls=[
                        ToolCallDelta(
                            index=event.index,
                            id=event.id,
                            type="function",
                            function=FunctionCallDelta(name=event.name, arguments=""),
                        )
                    ]
                )
            )
        elif isinstance(event, CallArguments):
            if not event.text:
                continue
            calls = previous.tool_calls if previous is not None else None
            if calls and calls[-1].index == event.index and calls[-1].id is None:
                calls[-1].function.arguments = (calls[-1].function.arguments or "") + event.text
            else:
                out.append(
                    ChatDelta(
                        tool_calls=[ToolCallDelta(index=event.index, function=FunctionCallDelta(arguments=event.text))]
                    )
                )
    return out
