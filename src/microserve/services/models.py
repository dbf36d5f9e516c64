"""The model table: every name clients may send as ``model``, with the engine that serves it.

One record serves every task. Several names may share one engine (a base model and the adapters on it): the
record's ``engine_key`` names the engine, and admission and lifecycle go by that key, so that they share its slots.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import cast

from microserve.engines.base import EncoderEngine, TextEngine
from microserve.errors import InvalidRequest, ModelNotFound, NotReady
from microserve.services.chat_template import ChatTemplate

ENCODER_TASKS = frozenset({"embedding", "ranking"})


@dataclass(eq=False)
class ServedModel:
    """One name a client can ask for: its task, its engine, and where it comes from."""

    name: str
    task: str
    engine: TextEngine | EncoderEngine
    engine_name: str
    # The engine instance behind the name; a base model's own name unless the name shares another's engine.
    engine_key: str = ""
    profile: str | None = None
    source: str | None = None
    # An adapter: the base model it runs on, and the name its engine knows it by.
    parent: str | None = None
    adapter: str | None = None
    template_family: str | None = None
    # Text an embedding model expects before an input of each NIM ``input_type``.
    prefixes: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))
    _template: ChatTemplate | None = None

    def __post_init__(self) -> None:
        self.engine_key = self.engine_key or self.name

    @property
    def encodes(self) -> bool:
        """Whether the model encodes (embeddings, ranking) rather than generates text."""
        return self.task in ENCODER_TASKS

    @property
    def text_engine(self) -> TextEngine:
        """The engine of a text model."""
        if self.encodes:
            raise TypeError(f"{self.name} is an {self.task} model")
        return cast(TextEngine, self.engine)

    @property
    def encoder(self) -> EncoderEngine:
        """The engine of an embedding or ranking model."""
        if not self.encodes:
            raise TypeError(f"{self.name} is a {self.task} model")
        return cast(EncoderEngine, self.engine)

    @property
    def template(self) -> ChatTemplate:
        """The chat template, built on first use once the engine knows the model's own template."""
        if self._template is None:
            info = self.text_engine.info
            self._template = ChatTemplate.choose(
                info.chat_template, self.template_family, bos_token=info.bos_token, eos_token=info.eos_token
            )
        return self._template


class ModelTable:
    """Name → served model, with OpenAI's errors for unknown and not-yet-loaded models and for a model asked to do
    what it cannot (a chat request to an embedding model and the reverse)."""

    def __init__(self, models: list[ServedModel]) -> None:
        self._models: dict[str, ServedModel] = {m.name: m for m in models}
        self._aliases = {alias.lower(): m.name for m in models if m.encodes for alias in (m.name, *m.aliases)}

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(list(self._models.values()))

    def add(self, model: ServedModel) -> None:
        """Serve ``model`` under its name (an adapter found while running); a name in use is a ValueError."""
        if model.name in self._models or model.name.lower() in self._aliases:
            raise ValueError(f"a model called `{model.name}` is already served")
        self._models[model.name] = model

    def remove(self, name: str) -> ServedModel | None:
        """Stop serving ``name`` (requests already admitted keep their engine); the record, if there was one."""
        return self._models.pop(name, None)

    def names(self) -> list[str]:
        """The served names, in registration order."""
        return list(self._models)

    def engines(self) -> dict[str, ServedModel]:
        """One model per engine (the first registered with each ``engine_key``), for lifecycle and load gauges."""
        out: dict[str, ServedModel] = {}
        for model in self._models.values():
            out.setdefault(model.engine_key, model)
        return out

    def find(self, name: str) -> ServedModel | None:
        """The model called ``name`` (encoders also by alias), loaded or not."""
        return self._models.get(name) or self._models.get(self._aliases.get(name.lower(), ""))

    def _lookup(self, name: str) -> ServedModel:
        model = self.find(name)
        if model is None:
            raise ModelNotFound(name, self.names())
        if not model.engine.ready:
            raise NotReady(f"the model `{name}` is still loading")
        return model

    def text(self, name: str) -> ServedModel:
        """The text model called ``name``; 404 if none, 400 if it is an encoder, 503 while it loads."""
        model = self._lookup(name)
        if model.encodes:
            raise InvalidRequest(
                f"`{model.name}` is an {model.task} model; it serves /v1/embeddings and /v1/ranking, "
                "not text generation",
                param="model",
                code="model_not_supported",
            )
        return model

    def encoder(self, name: str, *, route: str) -> ServedModel:
        """The encoder called ``name`` (aliases allowed); 404 if none, 400 if it generates text, 503 while loading."""
        model = self._lookup(name)
        if not model.encodes:
            raise InvalidRequest(
                f"`{model.name}` is a {model.task} model and does not serve {route}",
                param="model",
                code="model_not_supported",
            )
        return model

    def encoders(self, task: str) -> list[ServedModel]:
        """The served encoders of ``task`` (``embedding`` or ``ranking``), in registration order."""
        return [m for m in self._models.values() if m.encodes and m.task == task]
