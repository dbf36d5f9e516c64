"""Tool calling: rendering tools and tool history into the prompt, and parsing calls out of the output.

Templates that know tools (their source uses ``tools``) get the tool definitions and the history as Hugging Face
templates expect them. For templates without tool support (SmolLM2's, Gemma's, ChatML) microserve uses its tool
format, the Hermes/Qwen convention most small instruction models have seen:

* the tool definitions are appended to the system message as JSON lines inside ``<tools></tools>``, with an
  instruction to answer calls as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
* an assistant turn with ``tool_calls`` is rendered as its text followed by one such block per call;
* ``tool`` messages become a user turn holding ``<tool_response>\\n...\\n</tool_response>`` blocks.

The model's output is parsed for the same blocks whichever way the prompt was rendered. With ``tool_choice``
``required`` or a named function, decoding is constrained by a grammar to such blocks with valid arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from microserve.engines.base import Guide
from microserve.errors import InvalidRequest
from microserve.protocol.chat import ChatMessage, NamedToolChoice, ToolDefinition

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_MAX_HEADER = 512

ToolMode = Literal["none", "auto", "required", "named"]

_INSTRUCTIONS = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How a request uses its tools."""

    mode: ToolMode
    tools: tuple[ToolDefinition, ...] = ()
    parallel: bool = True
    # Required and named: the output is calls from the start; auto: from where the model opens one (the guide's
    # trigger), so a call it starts is always valid.
    guide: Guide | None = None

    @property
    def names(self) -> frozenset[str]:
        """Names of the functions the model may call."""
        return frozenset(t.function.name for t in self.tools)

    @property
    def active(self) -> bool:
        """Whether the output is parsed for tool calls."""
        return self.mode != "none" and bool(self.tools)


def plan_tools(tools: list[ToolDefinition] | None, choice: str | NamedToolChoice | None, parallel: bool) -> ToolPlan:
    """Validate ``tools`` and ``tool_choice`` together; required and named choices get a grammar guide."""
    tools = tools or []
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("tool function names must be unique", param="tools")
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise InvalidRequest(
                f"tool_choice names the function {choice.function.name!r}, which is not among the tools "
                f"({', '.join(names) or 'none given'})",
                param="tool_choice",
            )
        chosen = [t for t in tools if t.function.name == choice.function.name]
        return ToolPlan("named", tuple(tools), False, _guide(chosen, parallel=False, lazy=False))
    if choice in ("required", "auto") and not tools:
        raise InvalidRequest(f"tool_choice {choice!r} needs at least one tool in `tools`", param="tool_choice")
    if choice == "required":
        return ToolPlan("required", tuple(tools), parallel, _guide(tools, parallel=parallel, lazy=False))
    if choice == "auto":
        return ToolPlan("auto", tuple(tools), parallel, _guide(tools, parallel=parallel, lazy=True))
    return ToolPlan("none", tuple(tools), parallel)


def _guide(tools: list[ToolDefinition], *, parallel: bool, lazy: bool) -> Guide:
    spec = {
        "functions": [[t.function.name, t.function.parameters] for t in tools],
        "parallel": parallel,
        "open": f"{OPEN}\n",
        "close": f"\n{CLOSE}",
    }
    return Guide("tool_calls", spec, "tools", trigger=OPEN if lazy else None)


# -- rendering ------------------------------------------------------------------------------------------------


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def template_messages(messages: list[ChatMessage], plan: ToolPlan, *, native: bool) -> list[dict[str, Any]]:
    """Message dicts for the chat template; ``native`` when the template renders tools itself."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if native:
            item: dict[str, Any] = {"role": role, "content": m.text()}
            if m.tool_calls:
                item["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": _arguments_object(c.function.arguments)},
                    }
                    for c in m.tool_calls
                ]
            if m.tool_call_id:
                item["tool_call_id"] = m.tool_call_id
            if m.name:
                item["name"] = m.name
            out.append(item)
            continue
        if role == "tool":
            block = f"<tool_response>\n{m.text()}\n</tool_response>"
            if out and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_responses": True})
            continue
        text = m.text()
        if m.tool_calls:
            calls = [
                f"{OPEN}\n"
                + json.dumps({"name": c.function.name, "arguments": _arguments_object(c.function.arguments)})
                + f"\n{CLOSE}"
                for c in m.tool_calls
            ]
            text = "\n".join([text, *calls] if text else calls)
        out.append({"role": role, "content": text})
    for item in out:
        item.pop("_tool_responses", None)
    if not native and plan.active:
        listing = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in plan.tools)
        instructions = _INSTRUCTIONS.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{instructions}" if out[0]["content"] else instructions
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out


def native_tools(plan: ToolPlan) -> list[dict[str, Any]] | None:
    """The tool list passed to a template that renders tools itself."""
    if not plan.active:
        return None
    return [t.model_dump(exclude_none=True) for t in plan.tools]


# -- parsing --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TextOut:
    text: str


@dataclass(slots=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(slots=True)
class CallArguments:
    index: int
    text: str


ParseEvent = TextOut | CallStart | CallArguments


@dataclass(slots=True)
class ParsedCall:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False  # the arguments' JSON value ended (False: cut off by max_tokens)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


@dataclass(slots=True)
class ToolCallParser:
    """Splits streamed output into text and tool calls, emitting a call's name first and its arguments in pieces.

    Streaming and non-streaming responses both come from this parser, so they always agree.
    """

    names: frozenset[str]
    parallel: bool = True
    calls: list[ParsedCall] = field(default_factory=list)
    _buffer: str = ""
    _state: Literal["text", "header", "args", "tail"] = "text"
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    def feed(self, text: str) -> list[ParseEvent]:
        """Consume more output; return what can be emitted now."""
        self._buffer += text
        events: list[ParseEvent] = []
        while True:
            before = (self._state, len(self._buffer))
            getattr(self, f"_on_{self._state}")(events)
            if (self._state, len(self._buffer)) == before:
                return events

    def finish(self) -> list[ParseEvent]:
        """Flush at the end of the output."""
        events: list[ParseEvent] = []
        if self._state == "text" and self._buffer:
            events.append(TextOut(self._buffer))
        elif self._state == "header":
            events.append(TextOut(OPEN + self._buffer))
        self._buffer = ""
        return events

    def _on_text(self, events: list[ParseEvent]) -> None:
        if self.calls and not self.parallel:
            if self._buffer.strip():
                events.append(TextOut(self._buffer))
            self._buffer = ""
            return
        at = self._buffer.find(OPEN)
        if at >= 0:
            if self._buffer[:at]:
                events.append(TextOut(self._buffer[:at]))
            self._buffer = self._buffer[at + len(OPEN) :]
            self._state = "header"
            return
        keep = _partial_suffix(self._buffer, OPEN)
        emit = self._buffer[: len(self._buffer) - keep]
        if emit:
            events.append(TextOut(emit))
            self._buffer = self._buffer[len(emit) :]

    def _on_header(self, events: list[ParseEvent]) -> None:
        match = _HEADER.match(self._buffer)
        # Wait for a character after the header, so that whitespace before the arguments is never split.
        if match is not None and match.end() < len(self._buffer):
            try:
                name = json.loads(f'"{match.group(1)}"')
            except json.JSONDecodeError:
                name = None
            if name in self.names:
                call = ParsedCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name)
                self.calls.append(call)
                events.append(CallStart(len(self.calls) - 1, call.id, name))
                self._buffer = self._buffer[match.end() :]
                self._state = "args"
                self._depth, self._in_string, self._escaped = 0, False, False
                return
            self._as_text(events)
            return
        end = self._buffer.find(CLOSE)
        if end >= 0:
            self._whole_block(self._buffer[:end], events)
            self._buffer = self._buffer[end + len(CLOSE) :]
            self._state = "text"
        elif len(self._buffer) > _MAX_HEADER and not _could_be_header(self._buffer):
            self._as_text(events)

    def _whole_block(self, block: str, events: list[ParseEvent]) -> None:
        # A call whose keys come in another order or spelling: parsed once it is complete.
        try:
            value = json.loads(block)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and value.get("name") in self.names:
            arguments = value.get("arguments", value.get("parameters", {}))
            call = ParsedCall(
                id=f"call_{uuid.uuid4().hex[:24]}",
                name=value["name"],
                arguments=arguments if isinstance(arguments, str) else json.dumps(arguments),
            )
            call.complete = True
            self.calls.append(call)
            events.append(CallStart(len(self.calls) - 1, call.id, call.name))
            events.append(CallArguments(len(self.calls) - 1, call.arguments))
        else:
            events.append(TextOut(OPEN + block + CLOSE))

    def _as_text(self, events: list[ParseEvent]) -> None:
        events.append(TextOut(OPEN + self._buffer))
        self._buffer = ""
        self._state = "text"

    def _on_args(self, events: list[ParseEvent]) -> None:
        if not self.calls[-1].arguments:
            self._buffer = self._buffer.lstrip()
        if not self._buffer:
            return
        end = self._scan(self._buffer)
        piece = self._buffer if end is None else self._buffer[:end]
        if piece:
            self.calls[-1].arguments += piece
            events.append(CallArguments(len(self.calls) - 1, piece))
        self._buffer = "" if end is None else self._buffer[end:]
        if end is not None:
            self._state = "tail"
            self.calls[-1].complete = True

    def _scan(self, text: str) -> int | None:
        """Where the arguments' JSON value ends in ``text`` (exclusive), or None if it goes on."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
                continue
            if ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    return i + 1
        return None

    def _on_tail(self, events: list[ParseEvent]) -> None:
        end = self._buffer.find(CLOSE)
        if end >= 0:
            self._buffer = self._buffer[end + len(CLOSE) :]
            self._state = "text"


def _could_be_header(text: str) -> bool:
    return text.lstrip().startswith("{")
