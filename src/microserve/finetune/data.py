"""Training data: OpenAI's fine-tuning JSONL, checked line by line before anything is trained.

Two formats, one per file:

- chat: ``{"messages": [...], "tools": [...]?, "parallel_tool_calls": bool?}``, the messages as in a chat completion
  request (system/developer/user/assistant/tool, assistant ``tool_calls``), plus OpenAI's optional ``weight``
  (0 or 1) on assistant messages: weight 0 keeps the message as context without training on it;
- completion: ``{"prompt": "...", "completion": "..."}``, trained as raw text the way ``/v1/completions`` serves it.

Like OpenAI's validation, every bad line is reported with its number and the reason, and nothing is trained
while any line is bad. The sequence-length check needs the tokenizer and happens where examples are encoded
(:mod:`microserve.finetune.render`); its errors use the same :class:`LineError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from microserve.protocol.chat import ChatMessage, ToolDefinition

Format = Literal["chat", "completion"]

# Reports stay readable for a file that is wrong throughout; the count of the rest is still given.
MAX_REPORTED = 100


class TrainingMessage(ChatMessage):
    """A chat message of a training example: a request message plus OpenAI's ``weight``."""

    model_config = ConfigDict(extra="forbid")

    weight: Literal[0, 1] | None = None


class ChatExample(BaseModel):
    """One line of a chat-format file."""

    model_config = ConfigDict(extra="forbid")

    messages: list[TrainingMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    parallel_tool_calls: bool | None = None


class CompletionExample(BaseModel):
    """One line of a prompt/completion file."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    completion: str = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class Example:
    """A valid training example and the line it came from."""

    line: int
    chat: ChatExample | None = None
    completion: CompletionExample | None = None


@dataclass(frozen=True, slots=True)
class LineError:
    """Why one line of a training file cannot be used."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class DataError(Exception):
    """A training or validation file that cannot be trained on; ``errors`` lists every bad line."""

    def __init__(self, path: Path | str, errors: list[LineError], summary: str | None = None) -> None:
        self.path = str(path)
        self.errors = errors
        self.summary = summary
        super().__init__(self.describe())

    def describe(self) -> str:
        """One line per bad line (the first ``MAX_REPORTED``), after a summary line."""
        head = self.summary or f"{self.path}: {len(self.errors)} invalid line{'s' if len(self.errors) != 1 else ''}"
        lines = [head, *(f"  {e}" for e in self.errors[:MAX_REPORTED])]
        if len(self.errors) > MAX_REPORTED:
            lines.append(f"  ... and {len(self.errors) - MAX_REPORTED} more")
        return "\n".join(lines)


def _pydantic_reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unrecognized key `{where}`")
        elif err["type"] == "missing":
            parts.append(f"missing `{where}`")
        else:
            parts.append(f"`{where}`: {err['msg']}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _chat_problem(example: ChatExample) -> str | None:
    trained = [m for m in example.messages if m.role == "assistant" and m.weight != 0 and (m.text() or m.tool_calls)]
    if not trained:
        return "no assistant message to train on (each example needs one with content or tool calls, weight 1)"
    for index, message in enumerate(example.messages):
        if message.weight is not None and message.role != "assistant":
            return f"`messages.{index}.weight` is only allowed on assistant messages"
        if message.role != "assistant" and message.tool_calls:
            return f"`messages.{index}`: only assistant messages may have tool_calls"
        if message.role in ("system", "developer", "user") and not message.text():
            return f"`messages.{index}`: a {message.role} message needs content"
    if example.tools:
        names = [t.function.name for t in example.tools]
        if len(set(names)) != len(names):
            return "tool function names must be unique"
    return None


def parse_line(number: int, text: str) -> Example | LineError:
    """One line of a training file, as an example or the reason it is invalid."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        return LineError(number, f"invalid JSON: {exc.msg} (column {exc.colno})")
    if not isinstance(raw, dict):
        return LineError(number, f"expected a JSON object, got {type(raw).__name__}")
    if "messages" in raw:
        try:
            chat = ChatExample.model_validate(raw)
        except ValidationError as exc:
            return LineError(number, _pydantic_reason(exc))
        problem = _chat_problem(chat)
        return LineError(number, problem) if problem else Example(number, chat=chat)
    if "prompt" in raw or "completion" in raw:
        try:
            return Example(number, completion=CompletionExample.model_validate(raw))
        except ValidationError as exc:
            return LineError(number, _pydantic_reason(exc))
    return LineError(number, "expected `messages` (chat format) or `prompt` and `completion`")


def check_lines(lines: Iterable[str]) -> tuple[list[Example], list[LineError]]:
    """The valid examples of a JSONL text and an error for every bad line."""
    examples: list[Example] = []
    errors: list[LineError] = []
    first_format: Format | None = None
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue  # blank lines (a trailing newline, spacing) carry no example
        parsed = parse_line(number, text)
        if isinstance(parsed, LineError):
            errors.append(parsed)
            continue
        kind: Format = "chat" if parsed.chat is not None else "completion"
        if first_format is None:
            first_format = kind
        elif kind != first_format:
            errors.append(LineError(number, f"a {kind}-format example in a {first_format}-format file"))
            continue
        examples.append(parsed)
    return examples, errors


def parse_lines(lines: Iterable[str], source: str = "data") -> list[Example]:
    """Every example of a JSONL text; raises :class:`DataError` listing every bad line."""
    examples, errors = check_lines(lines)
    if errors:
        raise DataError(source, errors)
    if not examples:
        raise DataError(source, [], summary=f"{source}: no training examples")
    return examples


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; raises :class:`DataError` for other bytes, ``OSError`` if unreadable."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(path, [], summary=f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def load_examples(path: Path) -> list[Example]:
    """Read and check a JSONL training file; raises :class:`DataError` (every bad line) or ``OSError``."""
    return parse_lines(read_lines(path), str(path))


def file_format(examples: list[Example]) -> Format:
    """The format of a parsed file (all its examples share one)."""
    return "chat" if examples[0].chat is not None else "completion"
