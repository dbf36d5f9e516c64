"""The LoRA adapters served beside their base models, found in the adapter directory or loaded through the API.

At start, and every ``lora_refresh_interval`` seconds when that is set, the adapter directory is scanned: a new
sub-directory becomes a served adapter, a removed one is retired, a changed one is loaded again. Each adapter is
checked against the base models that take adapters (architecture, tensor shapes, the base its config names), made
ready by the catalog (for llama.cpp a PEFT adapter is converted to a GGUF LoRA once; vLLM loads the PEFT directory as
it is and checks its tensors itself), registered with the base model's engine and
added to the model table, where requests find it by ``model``. It shares the base model's engine, slots and queue.
A bad adapter is refused with its reason, logged once, and the others keep serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from microserve.catalog.adapters import (
    AdapterSource,
    PreparedAdapter,
    find_adapter,
    fingerprint,
    prepare,
    prepare_peft,
    scan,
)
from microserve.catalog.manifest import catalog
from microserve.catalog.peft_gguf import AdapterError, AdapterMissing, AdapterOutside
from microserve.catalog.plan import ServicePlan
from microserve.catalog.resolve import ResolvedModel
from microserve.engines.base import TextEngine
from microserve.engines.registry import engine_spec
from microserve.errors import Forbidden, InvalidRequest, ModelNotFound, NotFound, ServiceError
from microserve.services.models import ModelTable, ServedModel
from microserve.settings import Settings

log = logging.getLogger(__name__)

# Wraps a base model's engine for one adapter name (per-adapter metrics), as the app wraps every engine.
EngineView = Callable[[ServedModel, str], TextEngine]


@dataclass(slots=True)
class ServedAdapter:
    """An adapter being served: how it was prepared, its base model, and where it came from."""

    prepared: PreparedAdapter
    parent: str
    origin: str  # "directory" (found by a scan) or "api" (POST /v1/load_lora_adapter)
    stamp: tuple[tuple[str, int, int], ...]

    @property
    def name(self) -> str:
        """The adapter's served name."""
        return self.prepared.name


def takes_adapters(model: ResolvedModel, settings: Settings) -> bool:
    """Whether ``model`` serves adapters: on llama.cpp always (an adapter costs nothing until used); on vLLM only
    where an adapter directory is set, since vLLM reserves its LoRA slots at start and LoRA costs every step there
    (as vLLM's own server serves adapters only with --enable-lora)."""
    lora = engine_spec(model.engine).lora
    return lora == "gguf" or (lora == "peft" and settings.lora_dir is not None)


class AdapterManager:
    """Finds, checks, serves and retires the adapters of one app; every change goes through one lock."""

    def __init__(self, settings: Settings, plan: ServicePlan, models: ModelTable, view: EngineView) -> None:
        self.root = settings.resolved_lora_dir()
        self._cache = settings.cache_dir
        self._max_rank = settings.max_lora_rank
        self._models = models
        self._view = view
        self._bases: list[ResolvedModel] = [
            m for m in plan.models if takes_adapters(m, settings) and m.task in ("chat", "completion")
        ]
        everything = catalog(settings.catalog_dir)
        self._names = {m.name: tuple(n for n in (m.name, *m.manifest.names())) for m in self._bases}
        self._others = {
            m.name: tuple(n for manifest in everything if m.manifest.id != manifest.id for n in manifest.names())
            for m in self._bases
        }
        self._served: dict[str, ServedAdapter] = {}
        self._refused: dict[str, str] = {}
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        """Whether any served model takes adapters."""
        return bool(self._bases)

    def served(self) -> list[ServedAdapter]:
        """The adapters served now."""
        return list(self._served.values())

    def base_models(self) -> list[ResolvedModel]:
        """The served models that take adapters."""
        return list(self._bases)

    def base_model(self, name: str) -> ResolvedModel | None:
        """The served model that takes adapters and answers to ``name`` (its served name, catalog id or alias)."""
        wanted = name.lower()
        return next((b for b in self._bases if wanted in (n.lower() for n in self._names[b.name])), None)

    async def refresh(self) -> None:
        """Scan the adapter directory: serve new adapters, reload changed ones, retire removed ones."""
        if not self.enabled:
            return
        async with self._lock:
            found, refused = await asyncio.to_thread(scan, self.root)
            for name, served in list(self._served.items()):
                if served.origin == "directory" and name not in found:
                    await self._retire(name)
            for name, source in found.items():
                current = self._served.get(name)
                stamp = await asyncio.to_thread(fingerprint, source)
                if current is not None and (current.origin == "api" or current.stamp == stamp):
                    continue
                try:
                    await self._add(source, "directory", stamp)
                except (AdapterError, ServiceError) as exc:
                    refused[name] = str(exc.message if isinstance(exc, ServiceError) else exc)
            for name, reason in refused.items():
                if self._refused.get(name) != reason:
                    log.warning("adapter %s is not served: %s", name, reason)
            self._refused = refused

    async def load(self, name: str, path: str | None, *, origin: str = "api") -> ServedAdapter:
        """Serve the adapter ``name`` from ``path`` (inside the adapter directory; default: its sub-directory
        ``name``); a 400 naming the reason when it cannot be, a 404 when nothing is there, a 403 for a path
        outside the adapter directory. ``origin="directory"`` serves it as if a rescan had found it (a later rescan
        retires it when its sub-directory goes), as for an adapter a fine-tuning job wrote."""
        self._require()
        async with self._lock:
            try:
                source = find_adapter(self.root, name, path)
            except AdapterOutside as exc:
                raise Forbidden(str(exc), param="lora_path", code="path_outside_adapter_dir") from None
            except AdapterMissing as exc:
                raise NotFound(str(exc), param="lora_path", code="adapter_not_found") from None
            except AdapterError as exc:
                raise InvalidRequest(str(exc), param="lora_path", code="invalid_adapter") from None
            if name in self._served:
                raise InvalidRequest(
                    f"The lora adapter `{name}` has already been loaded.", param="lora_name", code="adapter_exists"
                )
            try:
                return await self._add(source, origin, await asyncio.to_thread(fingerprint, source))
            except AdapterError as exc:
                log.warning("adapter %s is not served: %s", name, exc)
                raise InvalidRequest(str(exc), param="lora_path", code="invalid_adapter") from None

    async def unload(self, name: str) -> None:
        """Retire the adapter ``name``: new requests get a 404, running ones finish first."""
        self._require()
        async with self._lock:
            if name not in self._served:
                raise ModelNotFound(name, [a.name for a in self._served.values()])
            await self._retire(name)

    def _require(self) -> None:
        if not self.enabled:
            # 404, as vLLM answers where runtime adapters are off: this server has no adapters to load or retire.
            raise NotFound("no served model takes LoRA adapters", param="lora_name", code="adapters_unsupported")

    async def _add(self, source: AdapterSource, origin: str, stamp: tuple[tuple[str, int, int], ...]) -> ServedAdapter:
        existing = self._models.find(source.name)
        if existing is not None and existing.adapter is None:
            raise AdapterError(f"`{source.name}` is the name of a served base model; rename the adapter")
        reasons = []
        for base in self._bases:
            parent = self._models.find(base.name)
            if parent is None:
                continue
            try:
                prepared = await asyncio.to_thread(self._prepare, source, base)
            except AdapterError as exc:
                reasons.append(f"{base.name}: {exc}" if len(self._bases) > 1 else str(exc))
                continue
            try:
                await parent.text_engine.load_adapter(source.name, str(prepared.path))
            except InvalidRequest as exc:
                reasons.append(exc.message)
                continue
            if existing is not None:
                self._models.remove(source.name)
            self._models.add(
                ServedModel(
                    name=source.name,
                    task=parent.task,
                    engine=self._view(parent, source.name),
                    engine_name=parent.engine_name,
                    engine_key=parent.engine_key,
                    profile=parent.profile,
                    source=str(source.path),
                    parent=parent.name,
                    adapter=source.name,
                    template_family=parent.template_family,
                )
            )
            served = ServedAdapter(prepared, parent.name, origin, stamp)
            self._served[source.name] = served
            log.info(
                "adapter %s served on %s (%s, rank %d, alpha %g)",
                source.name,
                parent.name,
                source.format,
                prepared.rank,
                prepared.alpha,
            )
            return served
        raise AdapterError("; ".join(reasons) or "no served model takes adapters")

    def _prepare(self, source: AdapterSource, base: ResolvedModel) -> PreparedAdapter:
        names, others = self._names[base.name], self._others[base.name]
        if engine_spec(base.engine).lora == "peft":
            return prepare_peft(source, base_names=names, other_models=others, max_rank=self._max_rank)
        return prepare(source, base.path, self._cache, base_names=names, other_models=others, max_rank=self._max_rank)

    async def _retire(self, name: str) -> None:
        served = self._served.pop(name)
        self._models.remove(name)
        parent = self._models.find(served.parent)
        if parent is not None:
            await parent.text_engine.unload_adapter(name)
        log.info("adapter %s retired", name)

    async def run(self, interval: float) -> None:
        """Rescan every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # a scan that fails must not stop the next one
                log.exception("rescanning the adapter directory failed")
