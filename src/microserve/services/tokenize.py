"""vLLM's tokenizer routes: text or chat messages to token ids with the model's own tokenizer, and back."""

from __future__ import annotations

from microserve.errors import InvalidRequest
from microserve.protocol.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from microserve.services.models import ModelTable, ServedModel
from microserve.services.tools import ToolPlan, template_messages


class TokenizeService:
    """Serves ``/tokenize`` and ``/detokenize`` for the text models; without ``model``, the first one."""

    def __init__(self, models: ModelTable) -> None:
        self._models = models

    def _model(self, name: str | None) -> ServedModel:
        if name is None:
            text = next((m for m in self._models if not m.encodes), None)
            if text is None:
                raise InvalidRequest("no text model is served", param="model")
            name = text.name
        return self._models.text(name)

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """Token ids of the prompt, or of the messages as the chat template renders them."""
        if (request.prompt is None) == (request.messages is None):
            raise InvalidRequest("give either `prompt` or `messages`", param="prompt")
        model = self._model(request.model)
        engine = model.text_engine
        if request.messages is not None:
            messages = template_messages(request.messages, ToolPlan("none"), native=model.template.supports_tools)
            text = model.template.render(messages, add_generation_prompt=request.add_generation_prompt)
            ids = engine.encode_prompt(text)
        else:
            assert request.prompt is not None
            ids = engine.tokenize(request.prompt, add_special=request.add_special_tokens)
        strs = [engine.detokenize([t]) for t in ids] if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.info.context_length, tokens=ids, token_strs=strs)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """The text of the token ids (ids outside the vocabulary are a 400)."""
        model = self._model(request.model)
        vocab = model.text_engine.info.vocab_size
        bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=model.text_engine.detokenize(request.tokens))
