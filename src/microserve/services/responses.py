"""OpenAI's Responses API on top of the chat service: the request becomes a chat request (templating, tools, output
formats, limits and every check are chat's), and chat's completion or chunks become a response or its semantic
events. Responses are kept in a bounded in-memory store for ``previous_response_id``, ``GET`` and ``DELETE``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from microserve.errors import InvalidRequest, ServiceError
from microserve.protocol.chat import ChatCompletion, ChatCompletionRequest
from microserve.protocol.common import Usage
from microserve.protocol.responses import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    FunctionTool,
    IncompleteDetails,
    InputMedia,
    InputTokensDetails,
    MessageItem,
    OutputFunctionCall,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    Response,
    ResponseEvent,
    ResponseRequest,
    ResponseUsage,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
)
from microserve.services.chat import ChatService, PreparedChat


class ResponseNotFound(ServiceError):
    """No stored response has that id (404)."""

    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, response_id: str) -> None:
        super().__init__(f"Response with id '{response_id}' not found.", param="response_id", code="not_found")


@dataclass(slots=True)
class StoredResponse:
    """A finished response and the conversation a follow-up continues: earlier turns, its input, its output."""

    response: Response
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]
    size: int = 0


class ResponseStore:
    """Stored responses in memory, the oldest evicted first once there are more than ``max_count`` or they take
    more than ``max_bytes`` (their JSON size)."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, stored: StoredResponse) -> None:
        """Keep ``stored``, evicting the oldest beyond the limits; one larger than ``max_bytes`` is not kept."""
        stored.size = len(stored.response.model_dump_json()) + len(json.dumps(stored.conversation))
        if self.max_count < 1 or stored.size > self.max_bytes:
            return
        self.delete(stored.response.id)
        self._items[stored.response.id] = stored
        self._bytes += stored.size
        while len(self._items) > self.max_count or self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.size

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, or None."""
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        """Forget a response; False if it was not stored."""
        old = self._items.pop(response_id, None)
        if old is None:
            return False
        self._bytes -= old.size
        return True


@dataclass(slots=True)
class PreparedResponse:
    """A validated Responses request: the chat request it became, and what the response echoes and stores."""

    id: str
    created: int
    request: ResponseRequest
    chat: PreparedChat
    input_items: list[dict[str, Any]]
    history: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_of(content: str | list[Any], param: str) -> str:
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        if isinstance(part, InputMedia):
            kind = part.type.removeprefix("input_")
            raise InvalidRequest(
                f"`{param}[{j}]` is an `{part.type}` part, but the served models take text only: {kind} input is not "
                "supported",
                param=f"{param}[{j}]",
                code="unsupported_content",
            )
    return "".join(part.text for part in content)


def input_items(request: ResponseRequest) -> list[dict[str, Any]]:
    """The request's input as item dicts (a string is one user message), refusing item kinds it cannot take."""
    if isinstance(request.input, str):
        return [{"type": "message", "role": "user", "content": request.input}]
    items = []
    for i, item in enumerate(request.input):
        if isinstance(item, MessageItem):
            items.append(
                {"type": "message", "role": item.role, "content": _text_of(item.content, f"input[{i}].content")}
            )
        elif isinstance(item, FunctionCallItem):
            items.append(
                {"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments}
            )
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
            items.append({"type": "function_call_output", "call_id": item.call_id, "output": output})
        elif item.type in ("message", "function_call", "function_call_output"):
            raise InvalidRequest(f"`input[{i}]` is not a valid `{item.type}` item", param=f"input[{i}]")
        else:
            raise InvalidRequest(
                f"`input[{i}]` is a `{item.type}` item, which this server does not take", param=f"input[{i}].type"
            )
    return items


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for the conversation ``items``: function calls join the assistant turn before them, and their
    outputs become tool messages."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        kind = item["type"]
        if kind == "message":
            messages.append({"role": item["role"], "content": item["content"]})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def _tools(request: ResponseRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    tools = []
    for i, tool in enumerate(request.tools or []):
        if not isinstance(tool, FunctionTool) and tool.type == "function":
            raise InvalidRequest(f"`tools[{i}]` is not a valid function tool: it needs a `name`", param=f"tools[{i}]")
        if not isinstance(tool, FunctionTool):
            raise InvalidRequest(
                f"`tools[{i}]` is a `{tool.type}` tool; this server runs no built-in tools, only `function` tools",
                param=f"tools[{i}].type",
            )
        definition: dict[str, Any] = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
        if tool.strict is not None:
            definition["strict"] = tool.strict
        tools.append({"type": "function", "function": definition})
    choice = request.tool_choice
    if isinstance(choice, FunctionChoice):
        choice = {"type": "function", "function": {"name": choice.name}}
    elif isinstance(choice, dict):
        raise InvalidRequest(
            f"`tool_choice` of type {choice.get('type')!r} is not supported: use none, auto, required or a function",
            param="tool_choice",
        )
    return tools or None, choice


def _format(request: ResponseRequest) -> dict[str, Any] | None:
    fmt = request.text.format if request.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise InvalidRequest("`text.format` of type json_schema needs a `schema`", param="text.format.schema")
    schema = {"name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}
    return {"type": "json_schema", "json_schema": schema}


def _validation_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return InvalidRequest(f"invalid value for `{where}`: {first.get('msg')}", param=where or None)


def response_usage(usage: Usage | None) -> ResponseUsage | None:
    """Chat usage in the Responses API's names."""
    if usage is None:
        return None
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(),
        total_tokens=usage.total_tokens,
    )


def output_items(items: list[OutputItem]) -> list[dict[str, Any]]:
    """Output items as the conversation items a follow-up request continues from."""
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, OutputMessage):
            out.append({"type": "message", "role": "assistant", "content": "".join(c.text for c in item.content)})
        else:
            out.append(
                {"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments}
            )
    return out


class ResponsesService:
    """Serves ``/v1/responses`` through the chat service, and keeps finished responses in a bounded store."""

    def __init__(self, chat: ChatService, store: ResponseStore) -> None:
        self._chat = chat
        self.store = store

    async def prepare(self, request: ResponseRequest) -> PreparedResponse:
        """The chat request this response runs as, validated as chat validates; raises a ServiceError for anything
        the client must fix."""
        # The model first, as every route checks it: a response of another model's conversation is never looked up.
        self._chat.text_model(request.model)
        history: list[dict[str, Any]] = []
        if request.previous_response_id is not None:
            previous = self.store.get(request.previous_response_id)
            if previous is None:
                raise InvalidRequest(
                    f"Previous response with id '{request.previous_response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            history = previous.conversation
        items = input_items(request)
        tools, choice = _tools(request)
        body: dict[str, Any] = {
            "model": request.model,
            "messages": chat_messages(request.instructions, history + items),
            "max_completion_tokens": request.max_output_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "tools": tools,
            "tool_choice": choice,
            "parallel_tool_calls": request.parallel_tool_calls,
            "response_format": _format(request),
            "user": request.user,
            "stream_options": {"include_usage": True},
        }
        try:
            chat_request = ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
        except ValidationError as exc:
            raise _validation_error(exc) from None
        prepared = await self._chat.prepare(chat_request)
        prepared.include_usage = True
        return PreparedResponse(
            id=_new_id("resp"),
            created=int(time.time()),
            request=request,
            chat=prepared,
            input_items=items,
            history=history,
            tools=[t.model_dump(exclude_none=True) for t in request.tools or []],
        )

    def _response(
        self,
        prepared: PreparedResponse,
        status: str,
        output: list[OutputItem],
        usage: ResponseUsage | None = None,
    ) -> Response:
        request = prepared.request
        fmt: dict[str, Any] = {"type": "text"}
        if request.text is not None and request.text.format is not None:
            fmt = request.text.format.model_dump(by_alias=True, exclude_none=True)
        choice = request.tool_choice if request.tool_choice is not None else "auto"
        return Response(
            id=prepared.id,
            created_at=prepared.created,
            status=status,  # type: ignore[arg-type]
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            model=prepared.chat.model.name,
            output=output,
            parallel_tool_calls=request.parallel_tool_calls,
            previous_response_id=request.previous_response_id,
            store=request.store,
            temperature=1.0 if request.temperature is None else request.temperature,
            text={"format": fmt},
            tool_choice=choice.model_dump() if isinstance(choice, FunctionChoice) else choice,
            tools=prepared.tools,
            top_p=1.0 if request.top_p is None else request.top_p,
            usage=usage,
            user=request.user,
            metadata=request.metadata or {},
        )

    def _keep(self, prepared: PreparedResponse, response: Response) -> None:
        if prepared.request.store:
            conversation = prepared.history + prepared.input_items + output_items(response.output)
            self.store.put(StoredResponse(response, prepared.input_items, conversation))

    async def complete(self, prepared: PreparedResponse) -> Response:
        """Run the request to the end and return the response (stored when ``store`` is true)."""
        result: ChatCompletion = await self._chat.complete(prepared.chat)
        choice = result.choices[0]
        output: list[OutputItem] = []
        message = choice.message
        if message.content or not message.tool_calls:
            output.append(
                OutputMessage(
                    id=_new_id("msg"),
                    status="incomplete" if choice.finish_reason == "length" else "completed",
                    content=[OutputText(text=message.content or "")],
                )
            )
        for call in message.tool_calls or []:
            output.append(
                OutputFunctionCall(
                    id=_new_id("fc"),
                    call_id=call.id,
                    name=call.function.name,
                    arguments=call.function.arguments,
                    status="completed",
                )
            )
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        response = self._response(prepared, status, output, response_usage(result.usage))
        self._keep(prepared, response)
        return response

    async def stream(self, prepared: PreparedResponse) -> AsyncIterator[StreamEvent]:
        """The response's semantic events, numbered in order: created, in progress, each output item with its
        text or argument deltas, then completed (or incomplete at ``max_output_tokens``)."""
        events = _EventBuilder(prepared)
        yield events.number(
            ResponseEvent(type="response.created", response=self._response(prepared, "in_progress", []))
        )
        yield events.number(
            ResponseEvent(type="response.in_progress", response=self._response(prepared, "in_progress", []))
        )
        usage = None
        finish = None
        async for chunk in self._chat.stream(prepared.chat):
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                delta = choice.delta
                if delta.content:
                    for event in events.text(delta.content):
                        yield event
                for call in delta.tool_calls or []:
                    for event in events.call(call.index, call.id, call.function.name, call.function.arguments):
                        yield event
                if choice.finish_reason is not None:
                    finish = choice.finish_reason
        status = "incomplete" if finish == "length" else "completed"
        for event in events.close(status):
            yield event
        response = self._response(prepared, status, events.output, response_usage(usage))
        self._keep(prepared, response)
        yield events.number(ResponseEvent(type=f"response.{status}", response=response))


class _EventBuilder:
    """Turns chat deltas into the Responses API's item events. Text opens a message item; each tool call opens a
    function-call item, closing the item before it. Whitespace before a first call is not a message."""

    def __init__(self, prepared: PreparedResponse) -> None:
        self._sequence = 0
        self.output: list[OutputItem] = []
        self._message: OutputMessage | None = None
        self._call: OutputFunctionCall | None = None
        self._calls: dict[int, OutputFunctionCall] = {}
        self._pending = ""

    def number(self, event: StreamEvent) -> StreamEvent:
        event.sequence_number = self._sequence
        self._sequence += 1
        return event

    def text(self, text: str) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        if self._message is None:
            self._pending += text
            if not self._pending.strip():
                return out
            text, self._pending = self._pending, ""
            out += self._close_call() + self._open_message()
        self._append(text)
        out.append(self._delta(text))
        return out

    def _open_message(self) -> list[StreamEvent]:
        message = OutputMessage(id=_new_id("msg"), status="in_progress", content=[])
        self._message = message
        self.output.append(message)
        index = len(self.output) - 1
        added = OutputItemEvent(
            type="response.output_item.added", output_index=index, item=message.model_copy(deep=True)
        )
        part = ContentPartEvent(
            type="response.content_part.added",
            item_id=message.id,
            output_index=index,
            content_index=0,
            part=OutputText(text=""),
        )
        message.content.append(OutputText(text=""))
        return [self.number(added), self.number(part)]

    def _append(self, text: str) -> None:
        assert self._message is not None
        self._message.content[0].text += text

    def _delta(self, text: str) -> StreamEvent:
        assert self._message is not None
        index = self._index(self._message)
        return self.number(TextDeltaEvent(item_id=self._message.id, output_index=index, content_index=0, delta=text))

    def call(self, index: int, call_id: str | None, name: str | None, arguments: str | None) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        item = self._calls.get(index)
        if item is None:
            out += self._close_message("completed") + self._close_call()
            self._pending = ""
            item = OutputFunctionCall(
                id=_new_id("fc"),
                call_id=call_id or _new_id("call"),
                name=name or "",
                arguments="",
                status="in_progress",
            )
            self._calls[index] = item
            self._call = item
            self.output.append(item)
            out.append(
                self.number(
                    OutputItemEvent(
                        type="response.output_item.added", output_index=len(self.output) - 1, item=item.model_copy()
                    )
                )
            )
        if arguments:
            item.arguments += arguments
            out.append(
                self.number(ArgumentsDeltaEvent(item_id=item.id, output_index=self._index(item), delta=arguments))
            )
        return out

    def close(self, status: str) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        if not self.output:
            # Nothing but whitespace, or nothing at all: the response still has its (empty) message.
            out += self._open_message()
            self._append(self._pending)
            if self._pending:
                out.append(self._delta(self._pending))
        return out + self._close_message(status) + self._close_call()

    def _index(self, item: OutputItem) -> int:
        return next(i for i, it in enumerate(self.output) if it is item)

    def _close_message(self, status: str) -> list[StreamEvent]:
        message = self._message
        if message is None:
            return []
        self._message = None
        index = self._index(message)
        message.status = "incomplete" if status == "incomplete" else "completed"
        part = message.content[0]
        return [
            self.number(TextDoneEvent(item_id=message.id, output_index=index, content_index=0, text=part.text)),
            self.number(
                ContentPartEvent(
                    type="response.content_part.done",
                    item_id=message.id,
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            ),
            self.number(OutputItemEvent(type="response.output_item.done", output_index=index, item=message)),
        ]

    def _close_call(self) -> list[StreamEvent]:
        call = self._call
        if call is None:
            return []
        self._call = None
        call.status = "completed"
        index = self._index(call)
        return [
            self.number(
                ArgumentsDoneEvent(item_id=call.id, output_index=index, name=call.name, arguments=call.arguments)
            ),
            self.number(OutputItemEvent(type="response.output_item.done", output_index=index, item=call)),
        ]
