"""Response models of the job interface, for the OpenAPI documentation."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from shared.jobs import Status, WebhookPayload, WebhookState
from shared.kinds import KindName
from shared.schemas import ErrorBody, HealthResponse, JobError


class _JobFields(BaseModel):
    """The public fields of shared.jobs.JobRecord that a job and its listing entry share."""

    job_id: str
    kind: KindName
    status: Status
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    progress: float = Field(description="0..1 while running (diarization reports per step)")
    step: str | None = Field(None, description="the step running; null once succeeded, the step it stopped in once failed or cancelled")
    attempts: int = Field(0, description="times a worker started the job: 2 or more after a redelivery")
    error: JobError | None = Field(None, description="the documented error body, once failed")
    webhook_url: str | None = None
    webhook: WebhookState | None = None
    webhook_payload: WebhookPayload | None = Field(
        None, description="what the webhook carries: 'full' (the record with its result) or 'status' (without it)"
    )
    batch_id: str | None = None
    filename: str | None = None
    sync: bool = Field(False, description="submitted through a synchronous endpoint")


class Job(_JobFields):
    """A job as a client sees it: the public fields of shared.jobs.JobRecord, and where to poll."""

    result: dict[str, Any] | None = Field(None, description="the synchronous endpoint's body, once succeeded")
    status_url: str


class JobSummary(_JobFields):
    """A job as a listing shows it (GET /jobs, GET /batches/{id}): the record without its result,
    which GET /jobs/{id} (the record) and GET /jobs/{id}/result (the result alone) carry."""

    status_url: str = Field(description="GET it for the whole record, result included")
    result_url: str | None = Field(None, description="GET it for the result alone (any format), once succeeded")


class JobList(BaseModel):
    jobs: list[JobSummary] = Field(description="newest first, without their results")
    count: int


class Batch(BaseModel):
    batch_id: str
    kind: KindName
    jobs: list[JobSummary] = Field(description="the batch's jobs in submission order, without their results")
    status_url: str
    counts: dict[str, int] = Field(description="jobs per status")


class Health(HealthResponse):
    broker: str = Field(description="'ok' or the reason the broker is unreachable ('unreachable' "
                        "alone to a caller without a key when the service has API keys)")
    workers: list[dict[str, Any]] | None = Field(
        description="live workers from their heartbeats; null to a caller without a key when the service has API keys")


# every status a route may answer in the documented error shape: 400 a malformed or cut-short
# multipart body, 403 a browser's request from another site, 408 a body that stalled, 429 a
# tenant past its quota of unfinished work and 507 no room left for uploads (both with Retry-After)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 408, 409, 413, 415, 422, 429, 500, 503, 504, 507)
}
