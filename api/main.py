"""FastAPI application: ``uvicorn api.main:app`` (or ``create_app(settings)`` in tests)."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from api import errors
from api.dispatch import Dispatcher
from api.limits import BodyLimitMiddleware
from api.metrics import build_registry
from api.routes import jobs, ops, sync
from shared.jobs import JobStore
from shared.webhooks import check_secret
from shared.settings import Settings, get_settings
from shared.storage import get_storage

DESCRIPTION = """Speaker diarization and verification.

The synchronous endpoints (`/diarize`, `/embedding`, `/compare`, `/compare_embedding`) keep the
original contract: they enqueue a job and wait for it. Long recordings go through `/jobs/*`:
submit (202 with a `status_url`), poll, or pass `webhook_url` to be POSTed the result, signed with
HMAC-SHA256 (`X-AudioAnalysis-Timestamp`, `X-AudioAnalysis-Signature`, `X-AudioAnalysis-Job-Id`).
Errors are always `{"detail", "error_type", "timestamp"}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # at start-up, not at import: uvicorn then exits with the reason instead of serving
        check_secret(settings.webhook_secret.get_secret_value(), allow_insecure=settings.allow_insecure_webhook_secret)
        yield
        await app.state.dispatcher.close()

    app = FastAPI(title="audio-analysis", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    from worker.celery_app import make_celery

    store = JobStore.from_settings(settings)
    storage = get_storage(settings)
    registry, latency = build_registry(store, settings)
    app.state.settings = settings
    app.state.store = store
    app.state.storage = storage
    app.state.registry = registry
    app.state.dispatcher = Dispatcher(settings, store, storage, make_celery(settings))

    errors.install(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes, body_timeout_s=settings.http_body_timeout_s)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        latency.labels(request.method, getattr(route, "path", "unmatched"), str(response.status_code)).observe(
            time.perf_counter() - started
        )
        return response

    app.include_router(ops.router)
    app.include_router(sync.router)
    app.include_router(jobs.router)
    app.include_router(jobs.batches)
    return app


app = create_app()
