"""The models a service serves, looked up by the name clients send as ``model``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from microserve.engines.base import EncoderEngine, TextEngine
from microserve.errors import InvalidRequest, ModelNotFound, NotReady
from microserve.services.chat_template import ChatTemplate


@dataclass(eq=False)
class ServedModel:
    """One served model: its public name, its engine and how to render chats for it."""

    name: str
    engine: TextEngine
    task: str = "chat"
    template_family: str | None = None
    profile: str | None = None
    engine_name: str | None = None
    source: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    _template: ChatTemplate | None = None

    @property
    def template(self) -> ChatTemplate:
        """The chat template, built on first use once the engine knows the model's own template."""
        if self._template is None:
            info = self.engine.info
            self._template = ChatTemplate.choose(
                info.chat_template, self.template_family, bos_token=info.bos_token, eos_token=info.eos_token
            )
        return self._template


@dataclass(eq=False)
class EncoderModel:
    """One served sentence encoder: an embedding model, or a cross-encoder that scores query/passage pairs."""

    name: str
    engine: EncoderEngine
    task: str = "embedding"
    prefixes: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    profile: str | None = None
    engine_name: str | None = None
    source: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


AnyModel = ServedModel | EncoderModel


class ModelRegistry:
    """Name → served model, with OpenAI's errors for unknown and not-yet-loaded models and for a model asked to do
    what it cannot (a chat request to an embedding model and the reverse)."""

    def __init__(self, models: list[ServedModel] | list[AnyModel]) -> None:
        self._models: dict[str, AnyModel] = {m.name: m for m in models}
        self._aliases = {
            alias.lower(): m.name for m in models if isinstance(m, EncoderModel) for alias in (m.name, *m.aliases)
        }

    def __iter__(self) -> Iterator[AnyModel]:
        return iter(self._models.values())

    def names(self) -> list[str]:
        """The served names, in registration order."""
        return list(self._models)

    def _lookup(self, name: str) -> AnyModel:
        model = self._models.get(name) or self._models.get(self._aliases.get(name.lower(), ""))
        if model is None:
            raise ModelNotFound(name, self.names())
        if not model.engine.ready:
            raise NotReady(f"the model `{name}` is still loading")
        return model

    def get(self, name: str) -> ServedModel:
        """The text model called ``name``; 404 if none, 400 if it is an encoder, 503 while it loads."""
        model = self._lookup(name)
        if isinstance(model, EncoderModel):
            raise InvalidRequest(
                f"`{model.name}` is an {model.task} model; it serves /v1/embeddings and /v1/ranking, "
                "not text generation",
                param="model",
                code="model_not_supported",
            )
        return model

    def get_encoder(self, name: str, *, route: str) -> EncoderModel:
        """The encoder called ``name`` (aliases allowed); 404 if none, 400 if it generates text, 503 while loading."""
        model = self._lookup(name)
        if not isinstance(model, EncoderModel):
            raise InvalidRequest(
                f"`{model.name}` is a {model.task} model and does not serve {route}",
                param="model",
                code="model_not_supported",
            )
        return model

    def encoders(self, task: str) -> list[EncoderModel]:
        """The served encoders of ``task`` (``embedding`` or ``ranking``), in registration order."""
        return [m for m in self._models.values() if isinstance(m, EncoderModel) and m.task == task]
