"""OpenAI's files and fine-tuning routes: ``/v1/files`` and ``/v1/fine_tuning/jobs``, thin over FineTuningJobs.

Every call on the jobs layer touches SQLite or the disk, so it runs in a worker thread, never on the event loop.
The caller's owner (the digest of its API key) comes from the auth middleware; each owner sees only its own files
and jobs, and another owner's id is a 404 like one that does not exist.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from microserve.errors import InvalidRequest
from microserve.finetune.jobs import FineTuningJobs
from microserve.protocol.fine_tuning import CreateJobRequest, FileDeleted, FileObject, FineTuningJob, Page
from microserve.server.auth import request_owner
from microserve.server.json_route import JsonBodyRoute
from microserve.server.routes import ERRORS

FILES_PATH = "/v1/files"
# Room for the multipart framing and the small fields around the file, on top of the file size limit.
FORM_OVERHEAD = 64 * 1024

router = APIRouter(tags=["fine-tuning"], responses=ERRORS)
json_router = APIRouter(tags=["fine-tuning"], responses=ERRORS, route_class=JsonBodyRoute)


def _jobs(request: Request) -> FineTuningJobs:
    jobs: FineTuningJobs = request.app.state.fine_tuning.jobs
    return jobs


# The multipart form, documented by hand: the route reads it as a stream (the file may be large), not as a model.
_UPLOAD_FORM: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "The JSONL file."},
                        "purpose": {"type": "string", "enum": ["fine-tune"]},
                    },
                }
            }
        },
    }
}


@router.post(FILES_PATH, response_model=FileObject, openapi_extra=_UPLOAD_FORM)
async def create_file(request: Request) -> FileObject:
    """Upload a file (multipart: ``file`` and ``purpose=fine-tune``)."""
    jobs = _jobs(request)
    try:
        form = await request.form(max_files=1, max_fields=16)
    except MultiPartException as exc:
        raise InvalidRequest(f"the upload is not valid multipart/form-data: {exc.message}", param="file") from None
    try:
        purpose = form.get("purpose")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("a file is required: send it as the multipart field `file`", param="file")
        if not isinstance(purpose, str) or not purpose:
            raise InvalidRequest("purpose is required: send `purpose=fine-tune`", param="purpose")
        return await run_in_threadpool(jobs.upload, request_owner(request), upload.filename or "", purpose, upload.file)
    finally:
        await form.close()


@router.get(FILES_PATH, response_model=Page)
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    after: str | None = None,
) -> Page:
    """The caller's files, newest first."""
    return await run_in_threadpool(_jobs(request).list_files, request_owner(request), purpose, after, limit, order)


@router.get(FILES_PATH + "/{file_id}", response_model=FileObject)
async def retrieve_file(file_id: str, request: Request) -> FileObject:
    """One of the caller's files."""
    return await run_in_threadpool(_jobs(request).retrieve_file, request_owner(request), file_id)


@router.delete(FILES_PATH + "/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, request: Request) -> FileDeleted:
    """Delete one of the caller's files and its bytes."""
    return await run_in_threadpool(_jobs(request).delete_file, request_owner(request), file_id)


@router.get(FILES_PATH + "/{file_id}/content", response_class=FileResponse)
async def file_content(file_id: str, request: Request) -> FileResponse:
    """The bytes of one of the caller's files."""
    jobs = _jobs(request)
    owner = request_owner(request)
    path = await run_in_threadpool(jobs.file_content, owner, file_id)
    row = await run_in_threadpool(jobs.retrieve_file, owner, file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=row.filename)


@json_router.post("/v1/fine_tuning/jobs", response_model=FineTuningJob)
async def create_job(body: CreateJobRequest, request: Request) -> FineTuningJob:
    """Create a fine-tuning job; it starts in ``validating_files``."""
    return await run_in_threadpool(_jobs(request).create_job, request_owner(request), body)


def _metadata_filter(request: Request) -> dict[str, str]:
    # OpenAI's `metadata[key]=value` query syntax.
    return {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.multi_items()
        if key.startswith("metadata[") and key.endswith("]")
    }


@router.get("/v1/fine_tuning/jobs", response_model=Page)
async def list_jobs(
    request: Request, after: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 20
) -> Page:
    """The caller's jobs, newest first."""
    metadata = _metadata_filter(request)
    return await run_in_threadpool(_jobs(request).list_jobs, request_owner(request), after, limit, metadata)


@router.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}", response_model=FineTuningJob)
async def retrieve_job(fine_tuning_job_id: str, request: Request) -> FineTuningJob:
    """One of the caller's jobs."""
    return await run_in_threadpool(_jobs(request).retrieve_job, request_owner(request), fine_tuning_job_id)


@router.post("/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel", response_model=FineTuningJob)
async def cancel_job(fine_tuning_job_id: str, request: Request) -> FineTuningJob:
    """Cancel a job: at once before it runs, after its current step while it runs."""
    return await run_in_threadpool(_jobs(request).cancel_job, request_owner(request), fine_tuning_job_id)


@router.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}/events", response_model=Page)
async def list_events(
    fine_tuning_job_id: str,
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> Page:
    """A job's events, newest first (one ``metrics`` event per training step)."""
    args: tuple[Any, ...] = (request_owner(request), fine_tuning_job_id, after, limit)
    return await run_in_threadpool(_jobs(request).list_events, *args)


@router.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", response_model=Page)
async def list_checkpoints(
    fine_tuning_job_id: str,
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
) -> Page:
    """A job's checkpoints (one per epoch), newest first."""
    args: tuple[Any, ...] = (request_owner(request), fine_tuning_job_id, after, limit)
    return await run_in_threadpool(_jobs(request).list_checkpoints, *args)
