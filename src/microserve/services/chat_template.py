"""Chat templates: the model's own Jinja template, a family template, or the generic fallback.

Order of choice: the GGUF's ``tokenizer.chat_template``; else the template of the family its manifest names
(``gemma``, ``chatml``); else ChatML, the generic fallback, whose markers most instruction-tuned models know.
Templates run in Jinja's immutable sandbox: a template is data from a model file and must not reach Python.

:meth:`ChatTemplate.render_segments` also tells the template's own markup from the client's text, so that only the
markup's special-token text becomes control tokens (engines/base.py ``PromptSegment``): the messages are rendered a
second time with every client string wrapped in two private-use marker characters, the markers are split out, and
the result is checked against the plain rendering. Whitespace at either end of a string stays outside its markers,
so templates that trim content (Gemma's ``| trim``) still check out; a template that otherwise rewrites content
(cuts it, changes case) fails the check, and the caller decides what is safe (services/chat.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from microserve.engines.base import PromptSegment
from microserve.errors import InvalidRequest

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma's turn format. Gemma has no system role: the system text opens the first user turn instead of being
# dropped, as Google's own template does.
GEMMA = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set ns.system = messages[0]['content'] + '\\n\\n' %}{% set messages = messages[1:] %}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (ns.system if loop.first else '') + message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass(frozen=True, slots=True)
class Family:
    """A template family: its Jinja source and the text that ends a turn."""

    source: str
    end_of_turn: str


FAMILIES: dict[str, Family] = {
    "chatml": Family(CHATML, "<|im_end|>"),
    "gemma": Family(GEMMA, "<end_of_turn>"),
}
FALLBACK = "chatml"


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """A rendered chat prompt: its text, its markup and content segments when they could be told apart (None when
    the template rewrote client text beyond recognition), and every client string that went into it."""

    text: str
    segments: tuple[PromptSegment, ...] | None
    client_text: tuple[str, ...]


# Markers are picked from Unicode's private use area, skipping any a client string or the template already holds.
_PRIVATE_USE = range(0xE000, 0xF900)
# Message fields holding the client's text; the role and the tool-call type are the template's vocabulary.
_MESSAGE_TEXT = ("content", "name", "tool_call_id")
_STRUCTURAL_KEYS = frozenset({"type", "role"})


class _Marker:
    """Wraps client strings in marker characters, keeping their outer whitespace outside the markers."""

    def __init__(self, start: str, end: str) -> None:
        self.start = start
        self.end = end
        self.seen: list[str] = []

    def text(self, value: str) -> str:
        self.seen.append(value)
        core = value.strip()
        if not core:
            return value
        head = value[: len(value) - len(value.lstrip())]
        tail = value[len(value.rstrip()) :]
        return f"{head}{self.start}{core}{self.end}{tail}"

    def tree(self, value: Any, *, keys: bool = False) -> Any:
        """Every string in a JSON-like value wrapped but the structural ones (``type``); with ``keys`` (call
        arguments: data throughout) every key too. A schema's property names are the client's as well."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.tree(item, keys=keys) for item in value]
        if not isinstance(value, dict):
            return value
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if not keys and key in _STRUCTURAL_KEYS and isinstance(item, str):
                out[key] = item
            elif keys:
                out[self.text(key) if isinstance(key, str) else key] = self.tree(item, keys=True)
            elif key == "properties" and isinstance(item, dict):
                out[key] = {self.text(k) if isinstance(k, str) else k: self.tree(v) for k, v in item.items()}
            else:
                out[key] = self.tree(item, keys=key == "arguments")
        return out

    def message(self, message: dict[str, Any]) -> dict[str, Any]:
        out = dict(message)
        for key in _MESSAGE_TEXT:
            if isinstance(out.get(key), str):
                out[key] = self.text(out[key])
        if isinstance(out.get("tool_calls"), list):
            out["tool_calls"] = self.tree(out["tool_calls"])
        return out


def _markers(texts: Iterable[str]) -> tuple[str, str]:
    used = set("".join(texts))
    free = (chr(c) for c in _PRIVATE_USE if chr(c) not in used)
    return next(free), next(free)


def split_marked(text: str, start: str, end: str) -> list[PromptSegment] | None:
    """Markup and content segments of ``text`` whose content is wrapped in ``start``/``end``; None when the
    markers do not pair up (the template cut or rearranged a client string)."""
    segments: list[PromptSegment] = []
    pos = 0
    while True:
        opened = text.find(start, pos)
        markup = text[pos:] if opened < 0 else text[pos:opened]
        if end in markup:
            return None
        if markup:
            segments.append(PromptSegment(markup, True))
        if opened < 0:
            return segments
        closed = text.find(end, opened + 1)
        if closed < 0 or start in text[opened + 1 : closed]:
            return None
        if closed > opened + 1:
            segments.append(PromptSegment(text[opened + 1 : closed], False))
        pos = closed + 1


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env


class ChatTemplate:
    """A compiled chat template plus the special-token text it refers to."""

    def __init__(self, source: str, *, bos_token: str, eos_token: str, end_of_turn: str | None) -> None:
        self.source = source
        self.end_of_turn = end_of_turn
        self._bos = bos_token
        self._eos = eos_token
        self._template = _environment().from_string(source)

    @classmethod
    def choose(cls, model_template: str | None, family: str | None, *, bos_token: str, eos_token: str) -> ChatTemplate:
        """The model's own template if it has one, else its family's, else the generic fallback."""
        if model_template:
            return cls(model_template, bos_token=bos_token, eos_token=eos_token, end_of_turn=None)
        chosen = FAMILIES.get(family or FALLBACK, FAMILIES[FALLBACK])
        return cls(chosen.source, bos_token=bos_token, eos_token=eos_token, end_of_turn=chosen.end_of_turn)

    @property
    def supports_tools(self) -> bool:
        """Whether the template renders a ``tools`` list itself (Hugging Face's tool-use convention)."""
        return "tools" in self.source

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text for ``messages``; a template that rejects them is the client's error (400)."""
        extra: dict[str, Any] = {"tools": tools} if tools else {}
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
                **extra,
            )
        except TemplateError as exc:
            raise InvalidRequest(f"the chat template rejected the messages: {exc}", param="messages") from exc

    def render_segments(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> RenderedPrompt:
        """The prompt for ``messages`` with the client's text told apart from the template's markup."""
        text = self.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        probe = _Marker("", "")
        for message in messages:
            probe.message(message)
        probe.tree(tools or [])
        client = tuple(probe.seen)
        marker = _Marker(*_markers([text, self.source, *client]))
        marked = self.render(
            [marker.message(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=marker.tree(tools) if tools else None,
        )
        segments = split_marked(marked, marker.start, marker.end)
        if segments is None or "".join(s.text for s in segments) != text:
            return RenderedPrompt(text, None, client)
        return RenderedPrompt(text, tuple(segments), client)
