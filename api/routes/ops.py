"""Operational endpoints, open without an API key: health and Prometheus metrics.

/health answers everyone (load balancers and probes carry no key), but with API keys on, only a
caller with a key sees the detail: the workers' host names, pids, devices and load errors, and
why the broker is unreachable (a Redis error names its host and port). A probe needs the status
alone.

Both read the job store in a thread of the pool every request shares, and neither asks for a
key. Each reading is therefore taken once for all the calls that come in while it is being taken
(:class:`SharedReading`): when the workers were found by a SCAN of the whole keyspace (every job
record and voiceprint; still so while no job worker of this release heartbeats, JobStore.workers),
80 anonymous calls at once held all 40 threads of the pool for seconds with 200,000 keys, and every
client's poll of its job waited for them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Generic, TypeVar

from fastapi import APIRouter, Request, Security
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep, api_key_header, authenticate
from api.errors import AuthError
from api.models import Health
from shared.jobs import JobStore
from shared.settings import Settings

router = APIRouter(tags=["operations"])

T = TypeVar("T")


class SharedReading(Generic[T]):
    """``read()`` (blocking: run in a thread of the pool), taken once for every call of
    :meth:`get` that comes in while it is being taken; a call that comes in after it ended gets a
    reading of its own. So at most one thread reads at a time however many calls arrive at once,
    and a client that calls again after an answer never gets one read before its call."""

    def __init__(self, read: Callable[[], T]) -> None:
        self._read = read
        self._pending: asyncio.Task[T] | None = None

    async def get(self) -> T:
        pending = self._pending
        if pending is None or pending.done() or pending.get_loop() is not asyncio.get_running_loop():
            pending = self._pending = asyncio.get_running_loop().create_task(run_in_threadpool(self._read))
            # an error with every caller gone (each disconnected) is not left unretrieved
            pending.add_done_callback(lambda task: task.cancelled() or task.exception())
        # shielded: a caller that hangs up does not cancel the reading the others wait for
        return await asyncio.shield(pending)


def _readings(request: Request) -> tuple[SharedReading[tuple[int, dict[str, Any]]], SharedReading[bytes]]:
    """This app's shared readings of /health and /metrics, made on first use."""
    state = request.app.state
    if getattr(state, "ops_readings", None) is None:
        store, registry = state.store, state.registry
        state.ops_readings = (SharedReading(lambda: _health(store)), SharedReading(lambda: generate_latest(registry)))
    return state.ops_readings


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
async def health(request: Request, settings: SettingsDep,
                 key: str | None = Security(api_key_header)) -> JSONResponse:
    code, body = await _readings(request)[0].get()
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
async def metrics(request: Request) -> Response:
    data = await _readings(request)[1].get()
    return Response(data, media_type=CONTENT_TYPE_LATEST)
