"""Template choice and rendering: the model's own, a family's, the fallback, and the sandbox."""

from __future__ import annotations

import pytest

from microserve.errors import InvalidRequest
from microserve.services.chat_template import ChatTemplate

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]


def test_gemma_family_folds_system_into_first_user_turn() -> None:
    template = ChatTemplate.choose(None, "gemma", bos_token="<bos>", eos_token="<eos>")
    text = template.render(MESSAGES)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert template.end_of_turn == "<end_of_turn>"


def test_gemma_without_system_message() -> None:
    template = ChatTemplate.choose(None, "gemma", bos_token="<bos>", eos_token="<eos>")
    assert template.render([{"role": "user", "content": "Hi"}]).startswith("<bos><start_of_turn>user\nHi<end")


def test_fallback_is_chatml() -> None:
    template = ChatTemplate.choose(None, None, bos_token="", eos_token="")
    assert template.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.end_of_turn == "<|im_end|>"


def test_model_template_wins_over_family() -> None:
    own = "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
    template = ChatTemplate.choose(own, "gemma", bos_token="", eos_token="")
    assert template.render([{"role": "user", "content": "x"}]) == "[user:x]"
    assert template.end_of_turn is None


def test_raise_exception_in_template_is_a_400() -> None:
    own = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    template = ChatTemplate.choose(own, None, bos_token="", eos_token="")
    with pytest.raises(InvalidRequest, match="first must be user"):
        template.render([{"role": "assistant", "content": "x"}])


def test_sandbox_blocks_python_internals() -> None:
    hostile = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    template = ChatTemplate.choose(hostile, None, bos_token="", eos_token="")
    with pytest.raises(InvalidRequest):
        template.render([{"role": "user", "content": "x"}])
