"""Chat templates: the model's own Jinja template, a family template, or the generic fallback.

Order of choice: the GGUF's ``tokenizer.chat_template``; else the template of the family its manifest names
(``gemma``, ``chatml``); else ChatML, the generic fallback, whose markers most instruction-tuned models know.
Templates run in Jinja's immutable sandbox: a template is data from a model file and must not reach Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
