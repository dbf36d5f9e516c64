"""NeMo Customizer's job routes, ``/v1/customization/jobs``, on the same jobs as ``/v1/fine_tuning/jobs``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from microserve.finetune.customization import Customizations
from microserve.protocol.customization import (
    CreateCustomizationRequest,
    CustomizationJob,
    CustomizationJobPage,
    CustomizationStatus,
    CustomizationStatusDetails,
)
from microserve.server.auth import request_owner
from microserve.server.json_route import JsonBodyRoute
from microserve.server.routes import ERRORS

router = APIRouter(tags=["customization"], responses=ERRORS)
json_router = APIRouter(tags=["customization"], responses=ERRORS, route_class=JsonBodyRoute)


def _customizations(request: Request) -> Customizations:
    customizations: Customizations = request.app.state.fine_tuning.customizations
    return customizations


@json_router.post("/v1/customization/jobs", response_model=CustomizationJob)
async def create_customization(body: CreateCustomizationRequest, request: Request) -> CustomizationJob:
    """Create a LoRA customization job (an OpenAI fine-tuning job as well)."""
    return await run_in_threadpool(_customizations(request).create, request_owner(request), body)


@router.get("/v1/customization/jobs", response_model=CustomizationJobPage)
async def list_customizations(
    request: Request,
    page: Annotated[int, Query(ge=1)] = 1,
    page_size: Annotated[int, Query(ge=1, le=1000)] = 10,
    sort: Annotated[str, Query(pattern="^-?created_at$")] = "created_at",
    status: Annotated[CustomizationStatus | None, Query(alias="filter[status]")] = None,
) -> CustomizationJobPage:
    """The caller's jobs, a page at a time."""
    customizations = _customizations(request)
    owner = request_owner(request)

    def listed() -> CustomizationJobPage:
        return customizations.list(owner, page=page, page_size=page_size, sort=sort, status=status)

    return await run_in_threadpool(listed)


@router.get("/v1/customization/jobs/{job_id}", response_model=CustomizationJob)
async def retrieve_customization(job_id: str, request: Request) -> CustomizationJob:
    """One of the caller's jobs."""
    return await run_in_threadpool(_customizations(request).retrieve, request_owner(request), job_id)


@router.get("/v1/customization/jobs/{job_id}/status", response_model=CustomizationStatusDetails)
async def customization_status(job_id: str, request: Request) -> CustomizationStatusDetails:
    """A job's progress: steps, epochs, losses, and its log."""
    return await run_in_threadpool(_customizations(request).status, request_owner(request), job_id)


@router.post("/v1/customization/jobs/{job_id}/cancel", response_model=CustomizationJob)
async def cancel_customization(job_id: str, request: Request) -> CustomizationJob:
    """Cancel a job."""
    return await run_in_threadpool(_customizations(request).cancel, request_owner(request), job_id)
