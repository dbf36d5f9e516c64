"""NIM's service description routes: ``/v1/metadata`` (what is served, how) and ``/v1/version``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from microserve import __version__
from microserve.profiles import ENGINE_PACKAGES, engine_version
from microserve.protocol.metadata import Metadata, ModelInfo, Version
from microserve.services.registry import ModelRegistry

router = APIRouter(tags=["nim"])


def _engines(registry: ModelRegistry) -> dict[str, str | None]:
    used = {m.engine_name for m in registry if m.engine_name} or {"llamacpp"}
    return {ENGINE_PACKAGES.get(e, (e, e))[0]: engine_version(e) for e in sorted(used)}


@router.get("/v1/metadata", response_model=Metadata, response_model_by_alias=True)
async def metadata(request: Request) -> Metadata:
    """The served models with their task, profile, engine and source, and the engine library versions."""
    registry: ModelRegistry = request.app.state.registry
    return Metadata(
        version=__version__,
        model_info=[
            ModelInfo(short_name=m.name, model_url=m.source, task=m.task, profile=m.profile, engine=m.engine_name)
            for m in registry
        ],
        engines=_engines(registry),
    )


@router.get("/v1/version", response_model=Version)
async def version(request: Request) -> Version:
    """The package release and the versions of the engine libraries in use."""
    return Version(release=__version__, engines=_engines(request.app.state.registry))
