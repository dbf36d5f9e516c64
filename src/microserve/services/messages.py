"""Anthropic's Messages API on top of the chat service: the request becomes a chat request (templating, tools,
limits and every check are chat's) and chat's completion or chunks become a message or Anthropic's events."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from microserve.errors import InvalidRequest
from microserve.protocol.anthropic import (
    AnthropicMessage,
    AnthropicUsage,
    BlockDelta,
    BlockStart,
    BlockStop,
    CountTokensRequest,
    JsonDelta,
    MediaBlock,
    MessageDelta,
    MessageResponse,
    MessagesRequest,
    MessageStart,
    MessageStop,
    OutputTextBlock,
    OutputToolUse,
    OutputUsage,
    Ping,
    StopDelta,
    StopReason,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    TokenCount,
    ToolResultBlock,
    ToolUseBlock,
)
from microserve.protocol.chat import ChatCompletionRequest
from microserve.protocol.common import Usage
from microserve.services.chat import ChatService, PreparedChat


def _refuse(block: MediaBlock, param: str) -> InvalidRequest:
    kind = "image" if block.type == "image" else "document"
    return InvalidRequest(
        f"`{param}` is an `{block.type}` block, but the served models take text only: {kind} input is not supported",
        param=param,
        code="unsupported_content",
    )


def _result_text(block: ToolResultBlock, param: str) -> str:
    content = block.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = []
        for k, part in enumerate(content):
            if isinstance(part, MediaBlock):
                raise _refuse(part, f"{param}.content[{k}]")
            parts.append(part.text)
        text = "\n".join(parts)
    return f"Error: {text}" if block.is_error else text


def chat_messages(system: str | list[TextBlock] | None, messages: list[AnthropicMessage]) -> list[dict[str, Any]]:
    """Chat messages for an Anthropic conversation: ``tool_use`` blocks become the assistant's tool calls and
    ``tool_result`` blocks tool messages, in their order among the text."""
    out: list[dict[str, Any]] = []
    if system:
        text = system if isinstance(system, str) else "\n".join(b.text for b in system)
        out.append({"role": "system", "content": text})
    for i, message in enumerate(messages):
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(message.content):
            param = f"messages[{i}].content[{j}]"
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, MediaBlock):
                raise _refuse(block, param)
            elif isinstance(block, ThinkingBlock):
                continue
            elif isinstance(block, ToolUseBlock):
                if message.role != "assistant":
                    raise InvalidRequest(f"`{param}`: tool_use blocks belong to assistant turns", param=param)
                calls.append(
                    {
                        "id": block.id,
                        "type": "function",
                        "function": {"name": block.name, "arguments": json.dumps(block.input)},
                    }
                )
            elif isinstance(block, ToolResultBlock):
                if message.role != "user":
                    raise InvalidRequest(f"`{param}`: tool_result blocks belong to user turns", param=param)
                if texts:
                    out.append({"role": "user", "content": "\n".join(texts)})
                    texts = []
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _result_text(block, param)})
        if calls:
            out.append({"role": "assistant", "content": "\n".join(texts) or None, "tool_calls": calls})
        elif texts:
            out.append({"role": message.role, "content": "\n".join(texts)})
    return out


def _tools(request: CountTokensRequest) -> tuple[list[dict[str, Any]] | None, Any, bool]:
    tools = []
    for i, tool in enumerate(request.tools or []):
        if tool.type not in (None, "custom"):
            raise InvalidRequest(
                f"`tools[{i}]` is a `{tool.type}` server tool; this server runs client tools only",
                param=f"tools[{i}].type",
            )
        tools.append(
            {
                "type": "function",
                "function": {"name": tool.name, "description": tool.description, "parameters": tool.input_schema},
            }
        )
    choice = request.tool_choice
    parallel = not (choice is not None and choice.disable_parallel_tool_use)
    mode: Any = None
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise InvalidRequest("`tool_choice` of type tool needs a `name`", param="tool_choice.name")
            mode = {"type": "function", "function": {"name": choice.name}}
        else:
            mode = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    return tools or None, mode, parallel


def chat_request(request: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request an Anthropic request runs as."""
    tools, choice, parallel = _tools(request)
    body: dict[str, Any] = {
        "model": request.model,
        "messages": chat_messages(request.system, request.messages),
        "tools": tools,
        "tool_choice": choice,
        "parallel_tool_calls": parallel,
    }
    if isinstance(request, MessagesRequest):
        user = (request.metadata or {}).get("user_id")
        body.update(
            max_completion_tokens=request.max_tokens,
            stop=request.stop_sequences,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            user=user if isinstance(user, str) else None,
        )
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        if where.startswith("messages") and "too_short" in str(first.get("type")):
            raise InvalidRequest("`messages` must hold at least one message", param="messages") from None
        raise InvalidRequest(f"invalid value for `{where}`: {first.get('msg')}", param=where or None) from None


@dataclass(slots=True)
class PreparedMessage:
    """A validated Messages request: the chat request it runs as."""

    id: str
    chat: PreparedChat

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the rendered prompt."""
        return len(self.chat.generation.prompt_tokens)


def _stop(finish: str | None, stop_string: str | None) -> tuple[StopReason, str | None]:
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if stop_string is not None:
        return "stop_sequence", stop_string
    return "end_turn", None


def _usage(usage: Usage | None, prompt_tokens: int) -> AnthropicUsage:
    if usage is None:
        return AnthropicUsage(input_tokens=prompt_tokens, output_tokens=0)
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return AnthropicUsage(
        input_tokens=usage.prompt_tokens - cached, output_tokens=usage.completion_tokens, cache_read_input_tokens=cached
    )


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {"value": value}


class MessagesService:
    """Serves ``/v1/messages`` and ``/v1/messages/count_tokens`` through the chat service."""

    def __init__(self, chat: ChatService) -> None:
        self._chat = chat

    async def prepare(self, request: MessagesRequest) -> PreparedMessage:
        """Validate and render as chat does; raises a ServiceError for anything the client must fix."""
        self._chat.text_model(request.model)  # the model first, as every route checks it
        prepared = await self._chat.prepare(chat_request(request))
        prepared.include_usage = True
        return PreparedMessage(id=f"msg_{uuid.uuid4().hex[:24]}", chat=prepared)

    def count(self, request: CountTokensRequest) -> TokenCount:
        """Tokens of the rendered prompt, tools included."""
        self._chat.text_model(request.model)
        return TokenCount(input_tokens=len(self._chat.prompt_tokens(chat_request(request))))

    async def complete(self, prepared: PreparedMessage) -> MessageResponse:
        """Run to the end and return one message."""
        result = await self._chat.complete(prepared.chat)
        choice = result.choices[0]
        content: list[OutputTextBlock | OutputToolUse] = []
        if choice.message.content or not choice.message.tool_calls:
            content.append(OutputTextBlock(text=choice.message.content or ""))
        for call in choice.message.tool_calls or []:
            content.append(
                OutputToolUse(
                    id=f"toolu_{uuid.uuid4().hex[:24]}",
                    name=call.function.name,
                    input=_tool_input(call.function.arguments),
                )
            )
        reason, sequence = _stop(choice.finish_reason, prepared.chat.stopped_by.get(0))
        return MessageResponse(
            id=prepared.id,
            model=prepared.chat.model.name,
            content=content,
            stop_reason=reason,
            stop_sequence=sequence,
            usage=_usage(result.usage, prepared.prompt_tokens),
        )

    async def stream(self, prepared: PreparedMessage) -> AsyncIterator[BaseModel]:
        """Anthropic's events: message_start, ping, each content block's start, deltas and stop, then
        message_delta with the stop reason and usage, and message_stop."""
        start = MessageResponse(
            id=prepared.id,
            model=prepared.chat.model.name,
            content=[],
            stop_reason=None,
            stop_sequence=None,
            usage=AnthropicUsage(input_tokens=prepared.prompt_tokens, output_tokens=0),
        )
        yield MessageStart(message=start)
        yield Ping()
        blocks = _Blocks()
        usage = None
        finish = None
        async for chunk in self._chat.stream(prepared.chat):
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                delta = choice.delta
                if delta.content:
                    for event in blocks.text(delta.content):
                        yield event
                for call in delta.tool_calls or []:
                    for event in blocks.call(call.index, call.function.name, call.function.arguments):
                        yield event
                if choice.finish_reason is not None:
                    finish = choice.finish_reason
        for event in blocks.close():
            yield event
        reason, sequence = _stop(finish, prepared.chat.stopped_by.get(0))
        output = usage.completion_tokens if usage is not None else 0
        yield MessageDelta(
            delta=StopDelta(stop_reason=reason, stop_sequence=sequence), usage=OutputUsage(output_tokens=output)
        )
        yield MessageStop()


class _Blocks:
    """Numbers content blocks as they open: text, then a tool_use block per call (each closing the one before).
    Whitespace before a first call is not a text block."""

    def __init__(self) -> None:
        self._count = 0
        self._open: str | None = None  # "text" or "tool"
        self._calls: set[int] = set()
        self._pending = ""

    def _start(self, block: OutputTextBlock | OutputToolUse, kind: str) -> list[BaseModel]:
        out = self._stop()
        self._open = kind
        out.append(BlockStart(index=self._count, content_block=block))
        return out

    def _stop(self) -> list[BaseModel]:
        if self._open is None:
            return []
        self._open = None
        self._count += 1
        return [BlockStop(index=self._count - 1)]

    def text(self, text: str) -> list[BaseModel]:
        out: list[BaseModel] = []
        if self._open != "text":
            self._pending += text
            if not self._pending.strip():
                return out
            text, self._pending = self._pending, ""
            out += self._start(OutputTextBlock(text=""), "text")
        out.append(BlockDelta(index=self._count, delta=TextDelta(text=text)))
        return out

    def call(self, index: int, name: str | None, arguments: str | None) -> list[BaseModel]:
        out: list[BaseModel] = []
        if index not in self._calls:
            self._calls.add(index)
            self._pending = ""
            block = OutputToolUse(id=f"toolu_{uuid.uuid4().hex[:24]}", name=name or "", input={})
            out += self._start(block, "tool")
        if arguments:
            out.append(BlockDelta(index=self._count, delta=JsonDelta(partial_json=arguments)))
        return out

    def close(self) -> list[BaseModel]:
        out: list[BaseModel] = []
        if self._count == 0 and self._open is None:
            # No block at all: the message still has its (empty, or whitespace) text block.
            out += self._start(OutputTextBlock(text=""), "text")
            if self._pending:
                out.append(BlockDelta(index=self._count, delta=TextDelta(text=self._pending)))
        return out + self._stop()
