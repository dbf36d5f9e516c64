"""The models a service serves, looked up by the name clients send as ``model``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from microserve.engines.base import TextEngine
from microserve.errors import ModelNotFound, NotReady
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


class ModelRegistry:
    """Name → served model, with OpenAI's errors for unknown and not-yet-loaded models."""

    def __init__(self, models: list[ServedModel]) -> None:
        self._models = {m.name: m for m in models}

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._models.values())

    def names(self) -> list[str]:
        """The served names, in registration order."""
        return list(self._models)

    def get(self, name: str) -> ServedModel:
        """The model called ``name``; 404 if none, 503 while it loads."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name, self.names())
        if not model.engine.ready:
            raise NotReady(f"the model `{name}` is still loading")
        return model
