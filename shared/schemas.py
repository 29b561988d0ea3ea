"""Response bodies of the original synchronous contract (../shared/spec/API.md)."""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel, Field


class Timing(BaseModel):
    processing_time: float = Field(description="seconds spent processing")
    audio_duration: float = Field(description="seconds of input audio")
    model_device: str = Field(description="cuda:N or cpu")


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


class ErrorResponse(BaseModel):
    detail: str
    error_type: str = Field(description="ValidationError | ProcessingError | ModelError")
    timestamp: str = Field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
