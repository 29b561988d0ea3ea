"""Response models of the job interface, for validation-free documentation in OpenAPI."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.schemas import HealthResponse


class JobError(BaseModel):
    detail: str
    error_type: str = Field(description="ValidationError | ProcessingError | ModelError")
    timestamp: str
    status_code: int = Field(description="HTTP status the synchronous endpoint answers with")


class WebhookState(BaseModel):
    status: Literal["pending", "retrying", "delivered", "failed"]
    attempts: int = 0
    last_error: str | None = None
    delivered_at: str | None = None


class Job(BaseModel):
    job_id: str
    kind: Literal["diarize", "embedding", "compare", "compare_embedding"]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    progress: float = Field(description="0..1 while running (diarization reports per step)")
    step: str | None = Field(None, description="pipeline step currently running")
    attempts: int = Field(0, description="times a worker started the job: 2 or more after a redelivery")
    result: dict[str, Any] | None = Field(None, description="the synchronous endpoint's body, once succeeded")
    error: JobError | None = Field(None, description="the documented error body, once failed")
    webhook_url: str | None = None
    webhook: WebhookState | None = None
    batch_id: str | None = None
    filename: str | None = None
    sync: bool = Field(False, description="submitted through a synchronous endpoint")
    status_url: str


class JobList(BaseModel):
    jobs: list[Job]
    count: int


class Batch(BaseModel):
    batch_id: str
    kind: str
    jobs: list[Job]
    status_url: str
    counts: dict[str, int] = Field(description="jobs per status")


class Health(HealthResponse):
    broker: str = Field(description="'ok' or the reason the broker is unreachable")
    workers: list[dict[str, Any]] = Field(description="live workers from their heartbeats")


class ErrorBody(BaseModel):
    detail: str
    error_type: str
    timestamp: str


ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 409, 413, 415, 422, 500, 503, 504)}
