"""What a service serves: settings and the machine turned into the list of models to load, each planned once.

The chat/completion models named by ``model`` come first, in order, under their ``served_model_name``; the embedding
and rerank models are served beside them unless a ``model`` already serves the same one. A forced profile applies to
each served model that has it; one that none has is a mistake. Every problem is a :class:`CatalogError` with a
one-line message, for the CLI to print and for an embedding application to handle.
"""

from __future__ import annotations

from dataclasses import dataclass

from microserve.catalog.errors import CatalogError
from microserve.catalog.manifest import Task
from microserve.catalog.resolve import Planned, ResolvedModel, lookup, resolve
from microserve.catalog.store import ModelStore
from microserve.hardware import Hardware, probe
from microserve.settings import Settings


class PlanError(CatalogError):
    """The settings describe a service that cannot exist: names that clash, a profile no model has."""


@dataclass(frozen=True, slots=True)
class ServicePlan:
    """The models to serve, resolved to verified artifacts and profiles, and the machine they were planned for."""

    models: tuple[ResolvedModel, ...]
    hardware: Hardware


def plan_service(
    settings: Settings, *, hardware: Hardware | None = None, store: ModelStore | None = None
) -> ServicePlan:
    """Plan every model ``settings`` asks for on ``hardware`` (default: this machine); raises CatalogError."""
    machine = hardware or probe()
    store = store or ModelStore(settings.cache_dir, offline=settings.offline, threads=settings.threads)
    names = settings.served_model_name
    if len(names) > len(settings.model):
        raise PlanError(f"{len(names)} served model names for {len(settings.model)} models")
    texts = [lookup(spec, None, settings.catalog_dir) for spec in settings.model]
    wanted: list[tuple[str | None, Task]] = [
        (settings.embedding_model, "embedding"),
        (settings.rerank_model, "ranking"),
    ]
    encoders = [lookup(spec, task, settings.catalog_dir) for spec, task in wanted if spec]
    forced = settings.profile
    if forced and not any(p.manifest.profile(forced) for p in (*texts, *encoders)):
        known = "; ".join(
            f"{p.manifest.id}: {', '.join(x.id for x in p.manifest.profiles)}" for p in (*texts, *encoders)
        )
        raise PlanError(f"no served model has a profile `{forced}` ({known})")
    served_ids = {p.manifest.id for p in texts}
    queue: list[tuple[Planned, str | None]] = [
        (planned, names[i] if i < len(names) else None) for i, planned in enumerate(texts)
    ]
    queue += [(planned, None) for planned in encoders if planned.manifest.id not in served_ids]
    models = tuple(
        resolve(
            planned,
            store,
            hardware=machine,
            served_name=name,
            profile=forced if forced and planned.manifest.profile(forced) else None,
        )
        for planned, name in queue
    )
    seen = [m.name for m in models]
    duplicates = sorted({n for n in seen if seen.count(n) > 1})
    if duplicates:
        raise PlanError(f"two served models are called {', '.join(duplicates)}; give each a --served-model-name")
    return ServicePlan(models, machine)
