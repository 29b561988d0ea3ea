"""The asynchronous job interface: submit (202), status, cancel, list, batches."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse

from api.deps import Principal, require_api_key
from api.dispatch import Dispatcher, view
from api.errors import JobNotFound
from api.forms import check_embedding_file, diarize_params, embedding_params, threshold_params, webhook_param
from api.models import ERRORS, Batch, Job, JobList
from shared.errors import InputError
from shared.jobs import STATES, new_job_id

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)], responses=ERRORS)
batches = APIRouter(prefix="/batches", tags=["jobs"], dependencies=[Depends(require_api_key)], responses=ERRORS)


def _d(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def _accepted(request: Request, kind: str, uploads: dict[str, UploadFile], params: dict[str, Any],
                    webhook_url: str | None, principal: Principal) -> JSONResponse:
    d = _d(request)
    webhook_url = await d.check_webhook(webhook_url)
    record = await d.submit(kind, uploads, params, webhook_url=webhook_url, principal=principal)
    body = view(record, _base(request))
    return JSONResponse(body, status_code=202, headers={"Location": body["status_url"]})


ACCEPTED = {202: {"model": Job, "description": "queued; poll status_url or wait for the webhook"}}


@router.post("/diarize", status_code=202, response_model=Job, responses=ACCEPTED, summary="Submit a diarization job")
async def submit_diarize(
    request: Request,
    file: UploadFile = File(...),
    params: dict[str, Any] = Depends(diarize_params),
    webhook_url: str | None = Depends(webhook_param),
    principal: Principal = Depends(require_api_key),
) -> JSONResponse:
    return await _accepted(request, "diarize", {"file": file}, params, webhook_url, principal)


@router.post("/embedding", status_code=202, response_model=Job, responses=ACCEPTED, summary="Submit an embedding job")
async def submit_embedding(
    request: Request,
    file: UploadFile = File(...),
    params: dict[str, Any] = Depends(embedding_params),
    webhook_url: str | None = Depends(webhook_param),
    principal: Principal = Depends(require_api_key),
) -> JSONResponse:
    return await _accepted(request, "embedding", {"file": file}, params, webhook_url, principal)


@router.post("/compare", status_code=202, response_model=Job, responses=ACCEPTED, summary="Submit a comparison job")
async def submit_compare(
    request: Request,
    file1: UploadFile = File(...),
    file2: UploadFile = File(...),
    params: dict[str, Any] = Depends(threshold_params),
    webhook_url: str | None = Depends(webhook_param),
    principal: Principal = Depends(require_api_key),
) -> JSONResponse:
    return await _accepted(request, "compare", {"file1": file1, "file2": file2}, params, webhook_url, principal)


@router.post("/compare_embedding", status_code=202, response_model=Job, responses=ACCEPTED,
             summary="Submit a comparison against a stored embedding")
async def submit_compare_embedding(
    request: Request,
    audio: UploadFile = File(...),
    embedding: UploadFile = File(...),
    params: dict[str, Any] = Depends(threshold_params),
    webhook_url: str | None = Depends(webhook_param),
    principal: Principal = Depends(require_api_key),
) -> JSONResponse:
    await check_embedding_file(embedding)
    params = {**params, "embedding_filename": embedding.filename}
    return await _accepted(request, "compare_embedding", {"audio": audio, "embedding": embedding}, params, webhook_url,
                           principal)


@router.post("/batch", status_code=202, response_model=Batch, summary="Submit several files as one batch",
             responses={202: {"model": Batch}})
async def submit_batch(
    request: Request,
    kind: Literal["diarize", "embedding"] = Form(..., description="the analysis run on every file"),
    files: list[UploadFile] = File(..., description="one job per file"),
    speaker_params: dict[str, Any] = Depends(diarize_params),
    embed_params: dict[str, Any] = Depends(embedding_params),
    webhook_url: str | None = Depends(webhook_param),
    principal: Principal = Depends(require_api_key),
) -> JSONResponse:
    """One job per file (each with its own webhook delivery); the batch groups them for polling."""
    d = _d(request)
    if not files:
        raise InputError("files: at least one file is required")
    webhook_url = await d.check_webhook(webhook_url)
    params = speaker_params if kind == "diarize" else embed_params
    batch_id = new_job_id()
    jobs = [
        view(await d.submit(kind, {"file": f}, params, webhook_url=webhook_url, batch_id=batch_id, principal=principal),
             _base(request))
        for f in files
    ]
    body = _batch_body(request, batch_id, kind, jobs)
    return JSONResponse(body, status_code=202, headers={"Location": body["status_url"]})


def _batch_body(request: Request, batch_id: str, kind: str, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    counts = dict.fromkeys(STATES, 0)
    for job in jobs:
        counts[job["status"]] += 1
    return {"batch_id": batch_id, "kind": kind, "jobs": jobs, "counts": counts,
            "status_url": f"{_base(request)}/batches/{batch_id}"}


@router.get("", response_model=JobList, summary="Recent jobs, newest first")
async def list_jobs(
    request: Request,
    limit: int = Query(20, ge=1, le=1000),
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = Query(None),
    kind: Literal["diarize", "embedding", "compare", "compare_embedding"] | None = Query(None),
    principal: Principal = Depends(require_api_key),
) -> dict[str, Any]:
    """The caller's own jobs (an admin key: everyone's)."""
    limit = min(limit, request.app.state.settings.jobs_list_limit)
    records = _d(request).store.recent(limit, status=status, kind=kind, owner=principal.list_owner)
    jobs = [view(r, _base(request)) for r in records if principal.can_see(r)]
    return {"jobs": jobs, "count": len(jobs)}


@router.get("/{job_id}", response_model=Job, summary="Status, progress and result of a job")
async def get_job(request: Request, job_id: str, principal: Principal = Depends(require_api_key)) -> dict[str, Any]:
    return view(_d(request).get(job_id, principal), _base(request))


@router.post("/{job_id}/cancel", response_model=Job, summary="Cancel a queued or running job")
async def cancel_job(request: Request, job_id: str, principal: Principal = Depends(require_api_key)) -> dict[str, Any]:
    """409 when the job already ended. Its upload is deleted at once."""
    return view(await _d(request).cancel(job_id, principal), _base(request))


@batches.get("/{batch_id}", response_model=Batch, summary="Status of every job of a batch")
async def get_batch(request: Request, batch_id: str, principal: Principal = Depends(require_api_key)) -> dict[str, Any]:
    records = [r for r in _d(request).store.batch(batch_id) if principal.can_see(r)]
    if not records:
        raise JobNotFound(f"no batch {batch_id} (unknown or expired)")
    return _batch_body(request, batch_id, records[0]["kind"], [view(r, _base(request)) for r in records])
