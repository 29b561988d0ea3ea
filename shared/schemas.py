"""Response bodies of the original synchronous contract (../shared/spec/API.md)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, Field


class Timing(BaseModel):
    processing_time: float = Field(description="seconds spent processing")
    audio_duration: float = Field(description="seconds of input audio")
    model_device: str = Field(description="cuda:N or cpu")
    peak_memory_mb: float | None = Field(
        None, description="the job's peak memory on its device: torch's peak allocation on a GPU, the worker "
        "process's peak resident memory on the CPU (set by the service's workers)",
    )


class DiarizationSegment(BaseModel):
    start: float
    end: float
    speaker: str


class DiarizationResponse(Timing):
    diarization_results: list[DiarizationSegment]
    segments_count: int


class EmbeddingResponse(Timing):
    embedding: list[float]
    normalized: bool


class CompareResponse(Timing):
    similarity_score: float
    same_speaker: bool
    threshold: float


class HealthResponse(BaseModel):
    status: str
    diarization_model_loaded: bool
    verification_model_loaded: bool


def utc_timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


ErrorType = Literal["ValidationError", "ProcessingError", "ModelError"]


class ErrorBody(BaseModel):
    """The one error shape of the contract: every 4xx/5xx body, and a failed job's ``error``."""

    detail: str
    error_type: ErrorType = Field(description="ValidationError | ProcessingError | ModelError")
    timestamp: str = Field(default_factory=utc_timestamp)


class JobError(ErrorBody):
    """A failed job's error: the body its synchronous endpoint answers, and with which status."""

    status_code: int = Field(500, description="HTTP status the synchronous endpoint answers with")
