"""FastAPI application: ``uvicorn api.main:app`` (or ``create_app(settings)`` in tests)."""

from __future__ import annotations

import re
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from api.deps import ApiKeyGate, CrossSiteGate, QuotaGate
from api.forms import refuse_loose_numbers, refuse_repeated_query
from api.hosts import HostGate
from api.dispatch import Dispatcher
from api.limits import BodyLimitMiddleware, CloseUnreadBody, RequestFramingGate
from api.metrics import build_registry
from api.routes import analyses, jobs, ops, voiceprints, web, webhooks
from shared import logs
from shared.jobs import JobStore
from shared.queue import make_celery
from shared.settings import Settings, get_settings
from shared.storage import get_storage
from shared.webhooks import check_secret

DESCRIPTION = """Speaker diarization and verification.

The synchronous endpoints (`/diarize`, `/embedding`, `/compare`, `/compare_embedding`) keep the
original contract: they enqueue a job and wait for it. Long recordings go through `/jobs/*`:
submit (202 with a `status_url`), poll, or pass `webhook_url` to be POSTed the result, signed with
HMAC-SHA256 (`X-AudioAnalysis-Timestamp`, `X-AudioAnalysis-Signature`, `X-AudioAnalysis-Job-Id`).
Known speakers: `POST /voiceprints` enrolls a person (one or more recordings and a label);
`voiceprints=<ids>|all` on `/diarize` and `/identify` names the speakers.
Errors are always `{"detail", "error_type", "timestamp"}`.
"""


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIdMiddleware:
    """Every request gets an id (the client's ``X-Request-ID`` when it is a sane token): in the
    response header, on every log line of the request, and in the job it creates.

    Every response also says ``X-Content-Type-Options: nosniff`` (the page's routes set it with
    the rest of their headers): a result export or an error echoes text a client chose, and a
    browser that sniffed it as HTML would run it on the API's origin."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else logs.new_request_id()

        async def with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                if not any(k.lower() == b"x-content-type-options" for k, _ in headers):
                    headers.append((b"x-content-type-options", b"nosniff"))
                message["headers"] = headers
            await send(message)

        with logs.bound(request_id=request_id):
            await self.app(scope, receive, with_header)


class PrivateAnswers:
    """A response to a request that carries an ``X-API-Key`` is ``Cache-Control: no-store``,
    unless its route said otherwise (``/`` says ``no-cache``).

    What such a request is answered depends on its key: ``GET /jobs`` and ``GET /voiceprints``
    list the key's own at one URL for every key, ``GET /health`` shows the workers' hosts to a key
    only, an export is a person's voiceprint. Said nothing, a shared cache in front of the API
    (Varnish by default keeps a GET's 200 two minutes whatever its X-API-Key; nginx with
    ``proxy_cache_valid``) answered the next caller of that URL, another tenant or nobody, with
    the first caller's answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not any(k == b"x-api-key" for k, _ in scope["headers"]):
            await self.app(scope, receive, send)
            return

        async def not_stored(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"cache-control" for k, _ in headers):
                    message = {**message, "headers": [*headers, (b"cache-control", b"no-store")]}
            await send(message)

        await self.app(scope, receive, not_stored)


class HeadAsGetMiddleware:
    """``HEAD`` is answered as ``GET`` without its body (RFC 9110 9.3.2), on every route.

    FastAPI's routes take only the methods they were declared with, so ``HEAD /health`` was a
    405 and load balancers and uptime probes that send HEAD saw the API as down; Starlette's plain
    routes and static files did answer it. One rule here instead of a HEAD beside every GET (which
    would also put a HEAD operation per route into the OpenAPI document): the request runs as the
    GET it stands for, through the same dependencies (a keyed route without a key is a 401), its
    status and headers (Content-Length, Content-Type included) are sent as they are, its body is not.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        # in place, not a copy: the router writes the matched route into this scope, which the
        # latency metric outside reads; HEAD again afterwards, for that metric's method label
        scope["method"] = "GET"
        try:
            await self.app(scope, receive, headers_only)
        finally:
            scope["method"] = "HEAD"


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class LatencyMiddleware:
    """Request latency per route and status, as plain ASGI.

    Not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware swallows the client's
    disconnect (``Request.is_disconnected`` never turns true behind it), and the synchronous
    endpoints cancel their job when their client hangs up.
    """

    def __init__(self, app: ASGIApp, latency: Histogram) -> None:
        self.app = app
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = scope.get("route")
            # labels only from bounded sets: any token is a method to HTTP, and one series per
            # made-up method grew the registry (and every scrape) without end
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.latency.labels(method, getattr(route, "path", "unmatched"), str(status["code"])).observe(
                time.perf_counter() - started
            )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # at start-up, not at import: uvicorn then exits with the reason instead of serving
        check_secret(settings.webhook_secret.get_secret_value(), allow_insecure=settings.allow_insecure_webhook_secret)
        yield
        await app.state.dispatcher.close()

    # /docs and /redoc come from api/routes/web.py: FastAPI's own pages load Swagger UI and
    # ReDoc from a CDN and show a blank page without internet
    # every route: a query parameter that takes one value, sent twice, is refused (422), and so
    # is a number (query or form) not written as plain digits
    app = FastAPI(title="audio-analysis", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  dependencies=[Depends(refuse_repeated_query), Depends(refuse_loose_numbers)])
    store = JobStore.from_settings(settings)
    storage = get_storage(settings)
    registry, latency = build_registry(store, settings)
    app.state.settings = settings
    app.state.store = store
    app.state.storage = storage
    app.state.registry = registry
    app.state.dispatcher = Dispatcher(settings, store, storage, make_celery(settings))

    errors.install(app)
    # innermost: everything outside sees the request as the HEAD it is
    app.add_middleware(HeadAsGetMiddleware)
    # a tenant at its quota of jobs is refused before the body is read (inside the body limit:
    # a body over the limit is told so first, as before)
    app.add_middleware(QuotaGate, settings=settings)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes, body_timeout_s=settings.http_body_timeout_s)
    # outside the body limit: a request without a valid key is refused before its body is read
    app.add_middleware(ApiKeyGate, settings=settings)
    # and so is a browser's request that another site's page sent (CSRF)
    app.add_middleware(CrossSiteGate)
    # and every request under a host name this API is not reached by (DNS rebinding)
    app.add_middleware(HostGate, settings=settings)
    # and, before all of these, a body framed two ways (request smuggling) or compressed
    app.add_middleware(RequestFramingGate)
    # around every refusal above and in the routes: one answered before its body was all read
    # closes the connection, so that the client stops sending
    app.add_middleware(CloseUnreadBody)

    app.add_middleware(LatencyMiddleware, latency=latency)
    # a keyed request's answer, refusals included, is kept by no cache
    app.add_middleware(PrivateAnswers)
    # outermost: even a refused body's 413 carries the request id
    app.add_middleware(RequestIdMiddleware)

    app.include_router(web.router)
    app.mount("/ui", web.assets, name="ui")
    app.mount("/docs-assets", web.docs_assets, name="docs-assets")
    app.include_router(ops.router)
    app.include_router(analyses.synchronous)
    app.include_router(jobs.router)
    app.include_router(jobs.batches)
    app.include_router(voiceprints.router)
    app.include_router(webhooks.router)
    return app


app = create_app()
