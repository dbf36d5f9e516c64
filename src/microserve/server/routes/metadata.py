"""NIM's service description routes: ``/v1/metadata`` (what is served, how) and ``/v1/version``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from microserve import __version__
from microserve.engines.registry import engine_spec
from microserve.protocol.metadata import AdapterInfo, CpuInfo, Metadata, ModelInfo, Version
from microserve.server.adapters import AdapterManager
from microserve.services.models import ModelTable

router = APIRouter(tags=["nim"])


def _engines(models: ModelTable) -> dict[str, str | None]:
    specs = sorted({engine_spec(m.engine_name) for m in models}, key=lambda spec: spec.name)
    return {spec.distribution: spec.library_version() for spec in specs}


@router.get("/v1/metadata", response_model=Metadata, response_model_by_alias=True)
async def metadata(request: Request) -> Metadata:
    """The served models with their task, profile, engine and source, the engine library versions, and the CPUs
    the service may use."""
    models: ModelTable = request.app.state.models
    manager: AdapterManager = request.app.state.adapters
    adapters = [
        AdapterInfo(
            name=a.name,
            parent=a.parent,
            rank=a.prepared.rank,
            alpha=a.prepared.alpha,
            format=a.prepared.source.format,
            source=str(a.prepared.source.path),
        )
        for a in manager.served()
    ]
    machine = request.app.state.plan.hardware
    return Metadata(
        version=__version__,
        model_info=[
            ModelInfo(short_name=m.name, model_url=m.source, task=m.task, profile=m.profile, engine=m.engine_name)
            for m in models
        ],
        engines=_engines(models),
        adapters=adapters,
        cpu=CpuInfo(
            logical_cores=machine.logical_cores, usable_cores=machine.usable_cores, cpu_quota=machine.cpu_quota
        ),
    )


@router.get("/v1/version", response_model=Version)
async def version(request: Request) -> Version:
    """The package release and the versions of the engine libraries in use."""
    return Version(release=__version__, engines=_engines(request.app.state.models))
