"""Every error leaves the API in the documented shape: {"detail", "error_type", "timestamp"}."""

from __future__ import annotations

import logging
import re

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import AnalysisError, InputError, ModelError, QuotaExceeded
from shared.schemas import ErrorBody, ErrorType

log = logging.getLogger(__name__)


class AuthError(InputError):
    status_code = 401


class JobNotFound(InputError):
    status_code = 404


# what a 404 may echo of the id it was asked for: ids this service makes are 32 hex digits
# (``vp_`` + 32 for voiceprints); a path's id of up to the 16 KB a request line holds, or with
# markup in it, was sent back whole in every 404
_ECHOED_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def not_found(what: str, value: str, why: str = "") -> JobNotFound:
    """404 for the ``what`` (job, batch, voiceprint) named ``value``, echoing the value only where
    it looks like an id; ``why`` is added after it ("unknown or expired")."""
    named = f"{what} {value}" if _ECHOED_ID.match(value or "") else f"{what} with that id (not an id this service makes)"
    return JobNotFound(f"no {named}" + (f" ({why})" if why else ""))


class JobConflict(InputError):
    status_code = 409


# Retry-After of a request whose Idempotency-Key another submission holds: that one is being
# stored and queued, which takes milliseconds to a few seconds (a large upload to a slow bucket),
# after which the retry gets its answer
KEY_IN_USE_RETRY_AFTER_S = 2


class KeyInUse(JobConflict):
    """409: the request's Idempotency-Key is held by a submission still being stored and queued
    (or this one's hold lapsed before its jobs were accepted, and none were kept): retry later,
    with the same key (api/idempotency.py). Retry-After is set by :func:`install`."""


# Retry-After of a submission refused by its tenant's quota (shared.errors.QuotaExceeded): a slot
# frees when one of the tenant's jobs ends, which its own polls or webhooks tell it; a client that
# only backs off learns of it within this, without hammering the API while a backlog drains
QUOTA_RETRY_AFTER_S = 30


class SyncTimeout(AnalysisError):
    status_code = 504


class StorageFull(ModelError):
    """The upload storage has no room left (ENOSPC, a quota): the service's state, not the
    client's mistake, and it passes; said as such instead of as an internal error."""

    status_code = 507


STORE_REFUSED = "job store cannot take new work now, retry later"


class StoreRefused(ModelError):
    """The job store refuses writes (a Redis at its maxmemory, a replica after a failover, one
    that cannot persist) until an operator or the failover acts: the service's state, for
    longer than a blip, so retried later (60 s) than an unreachable store (5 s)."""

    status_code = 503


def refuses_writes(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from: Celery and kombu wrap the broker's error) is
    Redis refusing writes: OOM, READONLY or MISCONF."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)):
            return True
        if isinstance(cause, redis.ResponseError) and \
                (str(cause).startswith("MISCONF") or "OOM command not allowed" in str(cause)):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class StorageUnavailable(ModelError):
    """The upload storage refused or could not be reached (an S3 bucket answering 503, down, a
    network in between): the service's state, to retry later."""

    status_code = 503


def error_response(status_code: int, detail: str, error_type: ErrorType, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(detail=detail, error_type=error_type)
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def _file_like(text: object) -> bool:
    """True for a form field's text that is a file's content rather than a value someone typed:
    longer than any file name, or holding control characters or bytes that were not UTF-8."""
    if not isinstance(text, str):
        return False
    return len(text) > 255 or any((c < " " and c not in "\t") or c == "\ufffd" for c in text)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "header")]
        where = ".".join(str(p) for p in loc)
        msg = str(err.get("msg", "invalid"))
        if "Expected UploadFile" in msg and loc:
            # text where a file goes: curl's -F file=meeting.wav without the @ that sends the
            # file, which was answered "Value error, Expected UploadFile, received: <class 'str'>"
            msg = (f"expected an uploaded file, got text (curl sends a file with an @: "
                   f"-F '{loc[0]}=@meeting.wav')")
            if _file_like(err.get("input")):
                # a file's bytes in a part that names no file (a form part is a file by its
                # Content-Disposition's filename= or filename*=): the curl hint sent such a
                # client looking in the wrong place
                msg = (f"expected an uploaded file, got a part of file content without a file name: give its "
                       f"Content-Disposition a filename=\"...\" (or filename*=UTF-8''...), as curl "
                       f"-F '{loc[0]}=@meeting.wav' does")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(AnalysisError)
    async def analysis_error(_: Request, exc: AnalysisError) -> JSONResponse:
        headers = {"WWW-Authenticate": "X-API-Key"} if exc.status_code == 401 else None
        if isinstance(exc, KeyInUse):
            headers = {"Retry-After": str(KEY_IN_USE_RETRY_AFTER_S)}
        elif isinstance(exc, QuotaExceeded):
            headers = {"Retry-After": str(QUOTA_RETRY_AFTER_S)}
        elif isinstance(exc, (StorageFull, StoreRefused)):
            headers = {"Retry-After": "60"}
        elif isinstance(exc, StorageUnavailable):
            headers = {"Retry-After": "30"}
        elif exc.status_code == 503:
            # the service cannot take it now (a broker restarting, a record lost): a client that
            # backs off by Retry-After, as for every other 503, gets it through
            headers = {"Retry-After": "5"}
        return error_response(exc.status_code, exc.detail, exc.error_type, headers)  # type: ignore[arg-type]

    @app.exception_handler(RequestValidationError)
    async def request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(exc), "ValidationError")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # 503 and 507 say the service cannot take the request now (as StorageFull does)
        error_type = "ValidationError" if exc.status_code < 500 else \
            "ModelError" if exc.status_code in (503, 507) else "ProcessingError"
        return error_response(exc.status_code, str(exc.detail), error_type, getattr(exc, "headers", None))

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def store_unavailable(_: Request, exc: redis.RedisError) -> JSONResponse:
        # Redis restarting or unreachable: the client may retry; nothing was accepted
        log.warning("job store unavailable: %s", exc)
        return error_response(503, "job store unavailable, retry later", "ModelError", {"Retry-After": "5"})

    @app.exception_handler(redis.ResponseError)
    async def store_refused(request: Request, exc: redis.ResponseError) -> JSONResponse:
        # a Redis at its maxmemory (OOM), a replica after a failover (READONLY) or one that cannot
        # persist (MISCONF) refuses writes until an operator or the failover acts: nothing was
        # accepted, and the client may retry later. Any other refusal is this service's bug
        if refuses_writes(exc):
            log.error("job store refused a write: %s", exc)
            return await analysis_error(request, StoreRefused(STORE_REFUSED))
        return await unexpected(request, exc)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal server error", "ProcessingError")
