"""Operational endpoints, open without an API key: health and Prometheus metrics.

/health answers everyone (load balancers and probes carry no key), but with API keys on, only a
caller with a key sees the detail: the workers' host names, pids, devices and load errors, and
why the broker is unreachable (a Redis error names its host and port). A probe needs the status
alone."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Security
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from api.deps import RegistryDep, SettingsDep, StoreDep, api_key_header, authenticate
from api.errors import AuthError
from api.models import Health
from shared.jobs import JobStore
from shared.settings import Settings

router = APIRouter(tags=["operations"])


def _health(store: JobStore) -> tuple[int, dict[str, Any]]:
    try:
        store.redis.ping()
        broker = "ok"
        workers = store.workers()
    except Exception as exc:  # noqa: BLE001
        broker, workers = f"unreachable: {type(exc).__name__}: {exc}", []
    diarization = any(w.get("diarization_model_loaded") for w in workers)
    verification = any(w.get("verification_model_loaded") for w in workers)
    if broker != "ok":
        status, code = "unhealthy", 503
    elif diarization and verification:
        status, code = "healthy", 200
    else:
        # the API can accept jobs; they wait until a worker with models is up
        status, code = "degraded", 200
    return code, {
        "status": status,
        "diarization_model_loaded": diarization,
        "verification_model_loaded": verification,
        "broker": broker,
        "workers": sorted(workers, key=lambda w: w.get("worker", "")),
    }


@router.get("/health", response_model=Health, responses={503: {"model": Health}},
            summary="Model state of the workers and broker reachability")
async def health(store: StoreDep, settings: SettingsDep,
                 key: str | None = Security(api_key_header)) -> JSONResponse:
    code, body = await run_in_threadpool(_health, store)
    if not _may_see_detail(key, settings):
        body = {**body, "broker": "ok" if body["broker"] == "ok" else "unreachable", "workers": None}
    return JSONResponse(body, status_code=code)


def _may_see_detail(key: str | None, settings: Settings) -> bool:
    try:
        authenticate(key, settings)
    except AuthError:
        return False
    return True


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(registry: RegistryDep) -> Response:
    data = await run_in_threadpool(generate_latest, registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
