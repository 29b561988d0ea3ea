"""Typed errors shared by the engine, the worker and the API.

Each error knows its ``error_type`` (the field of the documented error body) and the HTTP status
that the API answers with, so the mapping lives in one place and a worker can ship an error back
to the API through the result backend as plain data.
"""

from __future__ import annotations

from typing import Any

from shared.schemas import JobError


class AnalysisError(Exception):
    """Base of every error the service reports to a caller."""

    error_type: str = "ProcessingError"
    status_code: int = 500

    def __init__(self, detail: str, *, status_code: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if status_code is not None:
            self.status_code = status_code

    def about(self, what: str) -> "AnalysisError":
        """The same error (its class and status) said of ``what``, one of several inputs: "file2:
        audio is silent ...", where the bare words leave the caller guessing which."""
        return type(self)(f"{what}: {self.detail}", status_code=self.status_code)

    def body(self) -> JobError:
        """The documented error body, with the HTTP status it goes out with."""
        return JobError(detail=self.detail, error_type=self.error_type, status_code=self.status_code)  # type: ignore[arg-type]

    @classmethod
    def from_body(cls, data: JobError | dict[str, Any]) -> "AnalysisError":
        """Back from a stored or received body (a failed job, an HTTP error the client got)."""
        if isinstance(data, JobError):
            data = data.model_dump()
        kind = {c.error_type: c for c in (InputError, ProcessingError, ModelError)}.get(
            str(data.get("error_type")), ProcessingError
        )
        try:
            status = int(data.get("status_code", 500))
        except (TypeError, ValueError):
            status = 500
        return kind(str(data.get("detail", "unknown error")), status_code=status)


class InputError(AnalysisError):
    """The caller's mistake: bad audio, bad parameter, bad embedding file (4xx)."""

    error_type = "ValidationError"
    status_code = 422


class AudioDecodeError(InputError):
    """The bytes are not audio we can decode (corrupt, truncated, not audio at all)."""

    status_code = 415


class AudioTooLongError(InputError):
    status_code = 413


class ProcessingError(AnalysisError):
    """The service failed while processing valid input (5xx)."""

    error_type = "ProcessingError"
    status_code = 500


class ModelError(AnalysisError):
    """A model could not be loaded or is unavailable (503)."""

    error_type = "ModelError"
    status_code = 503


class QuotaExceeded(InputError):
    """A tenant's submission would take its unfinished work (jobs queued or running, their
    uploads' bytes) past its quota (``tenant_max_unfinished_*``): it submits again once some of
    its jobs ended (429, with Retry-After)."""

    status_code = 429
