"""Response bodies of the original synchronous contract (../shared/spec/API.md)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, Field, SerializationInfo, SerializerFunctionWrapHandler, model_serializer


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
    identity: str | None = Field(
        None, description="the speaker's voiceprint label (only when the job named voiceprints; null: nobody known)"
    )


class RunnerUp(BaseModel):
    voiceprint_id: str
    label: str
    score: float = Field(description="cosine similarity with this voiceprint")


class Match(BaseModel):
    identity: str | None = Field(description="label of the voiceprint matched, or null when none passes the threshold")
    voiceprint_id: str | None = None
    confidence: float | None = Field(
        description="cosine similarity with the matched voiceprint (with the closest one when none matched); "
        "null when there was too little speech to score"
    )
    runner_up: RunnerUp | None = Field(description="the best-scoring voiceprint other than the one matched (or closest)")
    speech_seconds: float = Field(description="speech the embedding was computed from")


class SpeakerIdentity(Match):
    speaker: str


_NARROWBAND_THRESHOLD = (
    "the threshold the voiceprints enrolled from telephone recordings were held to, when the recording is "
    "one (8 kHz or less) and no threshold was given; then `threshold` is the one every other voiceprint was "
    "held to (the same value when all of them were enrolled from telephone recordings). null: every "
    "voiceprint was held to `threshold`"
)


class Identification(BaseModel):
    threshold: float = Field(description="cosine threshold a match must reach")
    narrowband_threshold: float | None = Field(None, description=_NARROWBAND_THRESHOLD)
    model: str = Field(description="embedding model of the voiceprints and the speakers' embeddings")
    voiceprints: int = Field(description="voiceprints compared")
    processing_time: float = Field(description="seconds the identification added to the diarization")


class DiarizationResponse(Timing):
    diarization_results: list[DiarizationSegment]
    segments_count: int
    # present only when the job named voiceprints: without them the body is the original contract's
    speakers: list[SpeakerIdentity] | None = Field(
        None, description="per speaker: identity, confidence and runner-up (only with voiceprints)"
    )
    identification: Identification | None = Field(None, description="how speakers were named (only with voiceprints)")

    @model_serializer(mode="wrap")
    def _contract(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo):
        data = handler(self)
        if self.speakers is None and isinstance(data, dict):
            data.pop("speakers", None)
            data.pop("identification", None)
            for segment in data.get("diarization_results", ()):
                if isinstance(segment, dict):
                    segment.pop("identity", None)
        return data


class IdentifyResponse(Match, Timing):
    threshold: float
    narrowband_threshold: float | None = Field(None, description=_NARROWBAND_THRESHOLD)
    model: str
    voiceprints: int = Field(description="voiceprints compared")


class EnrollResponse(Timing):
    label: str
    model: str = Field(description="embedding model of the vector")
    dimension: int
    embedding: list[float] = Field(description="speech-weighted average over the files, L2-normalised")
    speech_seconds: float = Field(description="speech detected over all files")
    file_speech_seconds: list[float] = Field(description="speech detected in each file, in order")
    narrowband: bool = Field(False, description="every file was recorded at 8 kHz or less (a telephone call)")


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
