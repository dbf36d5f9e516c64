"""Examples -> token ids and loss labels, rendered exactly as the server renders a request.

A chat example goes through the server's own steps (``template_messages`` for tools, then the model's chat
template). Each assistant message to train on is found by rendering the conversation up to it with the generation
prompt, and through it without: the difference is the assistant's text plus the template's end of turn, which is
what the model must produce when served. The pieces are tokenized one by one, so the prompt side is tokenized
exactly as the server tokenizes a prompt ending in the generation prompt. Only assistant tokens carry a label.

A prompt/completion example is the raw text ``/v1/completions`` sees: the prompt, then the completion and the
end-of-sequence token, trained on the completion and the end token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from microserve.errors import ServiceError
from microserve.finetune.data import ChatExample, Example, LineError
from microserve.protocol.chat import ChatMessage
from microserve.services.chat_template import ChatTemplate
from microserve.services.tools import native_tools, plan_tools, template_messages

IGNORE = -100  # the label torch's cross entropy skips


class Tokenizer(Protocol):
    """The serving model's tokenizer, as the training data needs it."""

    bos_token: str
    eos_token: str
    eos_id: int
    add_bos: bool

    def encode(self, text: str, *, add_special: bool) -> list[int]:
        """Token ids of ``text`` with special tokens written as text parsed; ``add_special`` adds BOS."""
        ...


@dataclass(frozen=True, slots=True)
class Encoded:
    """One example as the model trains on it."""

    line: int
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        """Tokens that carry a label."""
        return sum(1 for label in self.labels if label != IGNORE)


class Renderer:
    """Turns examples into :class:`Encoded` with ``template`` and ``tokenizer``."""

    def __init__(self, template: ChatTemplate, tokenizer: Tokenizer) -> None:
        self.template = template
        self.tokenizer = tokenizer

    def _pieces(self, texts: Sequence[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        tok = self.tokenizer
        for text, trained in texts:
            if not text:
                continue
            add = not ids and tok.add_bos and not (tok.bos_token and text.startswith(tok.bos_token))
            piece = tok.encode(text, add_special=add)
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        return ids, labels

    def chat_texts(self, chat: ChatExample) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, trained) pieces, ending with the last trained assistant turn."""
        plain = [ChatMessage.model_validate(m.model_dump(exclude={"weight"}, exclude_none=True)) for m in chat.messages]
        parallel = chat.parallel_tool_calls if chat.parallel_tool_calls is not None else True
        plan = plan_tools(chat.tools, None, parallel)
        native = self.template.supports_tools
        rendered = template_messages(plain, plan, native=native)
        tools = native_tools(plan) if native else None
        weights = [m.weight for m in chat.messages if m.role == "assistant"]
        assistants = [i for i, m in enumerate(rendered) if m["role"] == "assistant"]
        pieces: list[tuple[str, bool]] = []
        done = 0
        for index, weight in zip(assistants, weights, strict=True):
            if weight == 0:
                continue
            prompt = self.template.render(rendered[:index], add_generation_prompt=True, tools=tools)
            through = self.template.render(rendered[: index + 1], add_generation_prompt=False, tools=tools)
            if not through.startswith(prompt) or len(prompt) < done:
                raise ValueError("the chat template does not render this conversation turn by turn")
            pieces.append((prompt[done:], False))
            pieces.append((through[len(prompt) :], True))
            done = len(through)
        return pieces

    def encode(self, example: Example) -> Encoded:
        """The example's token ids and labels; raises ``ValueError`` when the template cannot render it."""
        if example.chat is not None:
            try:
                texts = self.chat_texts(example.chat)
            except ServiceError as exc:
                raise ValueError(str(exc)) from exc
            ids, labels = self._pieces(texts)
        else:
            assert example.completion is not None
            ids, labels = self._pieces([(example.completion.prompt, False), (example.completion.completion, True)])
            ids.append(self.tokenizer.eos_id)
            labels.append(self.tokenizer.eos_id)
        return Encoded(example.line, ids, labels)

    def encode_all(self, examples: list[Example], max_tokens: int) -> tuple[list[Encoded], list[LineError]]:
        """Every example encoded, and a :class:`LineError` for each one over ``max_tokens`` or unrenderable."""
        encoded: list[Encoded] = []
        errors: list[LineError] = []
        for example in examples:
            try:
                item = self.encode(example)
            except ValueError as exc:
                errors.append(LineError(example.line, str(exc)))
                continue
            if len(item.input_ids) > max_tokens:
                errors.append(
                    LineError(example.line, f"{len(item.input_ids)} tokens, over the sequence limit of {max_tokens}")
                )
                continue
            if item.trained_tokens == 0:
                errors.append(LineError(example.line, "nothing to train on after rendering"))
                continue
            encoded.append(item)
        return encoded, errors
