"""Worker process start-up and shutdown: load the models once, then heartbeat into Redis.

``worker_process_init`` fires in every pool process (prefork children and the solo pool), which
is the process that runs jobs, so that is where the models are loaded and where the heartbeat
that /health reads is written from.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from celery import signals

from shared.jobs import JobStore, utc_now
from shared.settings import get_settings
from shared.storage import get_storage

log = logging.getLogger(__name__)

_state: dict[str, Any] = {"name": None, "stop": threading.Event(), "thread": None, "load_error": None}


def worker_name() -> str:
    return _state["name"] or f"{socket.gethostname()}:{os.getpid()}"


def heartbeat_info() -> dict[str, Any]:
    from shared.engine import get_engine

    settings = get_settings()
    engine = get_engine()
    return {
        "worker": worker_name(),
        "pid": os.getpid(),
        "diarization_model_loaded": engine.diarization_loaded,
        "verification_model_loaded": engine.verification_loaded,
        "model_device": engine.model_device,
        "loads_models": settings.worker_load_models,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "load_error": _state["load_error"],
        "last_seen": utc_now(),
    }


def _heartbeat_loop(stop: threading.Event) -> None:
    settings = get_settings()
    store = JobStore.from_settings(settings)
    storage = get_storage(settings)
    interval = settings.worker_heartbeat_interval_s
    next_sweep = 0.0
    while not stop.is_set():
        try:
            store.heartbeat(worker_name(), heartbeat_info(), ttl_s=interval * 3)
            if time.monotonic() >= next_sweep:
                # uploads of jobs that never reached a worker (expired, purged queue)
                removed = storage.sweep(settings.upload_expires_s)
                if removed:
                    log.info("swept %d expired upload folders", removed)
                next_sweep = time.monotonic() + settings.storage_sweep_interval_s
        except Exception:  # noqa: BLE001 - a Redis blip must not kill the heartbeat
            log.exception("heartbeat failed")
        stop.wait(interval)


@signals.worker_init.connect
def preimport(**_: Any) -> None:
    # import torch and the pipelines once in the main process so every forked pool process
    # starts with them; no model is built and CUDA is not touched here, so forking stays safe
    if get_settings().worker_load_models:
        import shared.engine  # noqa: F401


@signals.worker_process_init.connect
def boot(sender: str | None = None, **_: Any) -> None:
    from shared.engine import get_engine

    _state["name"] = f"{sender or socket.gethostname()}:{os.getpid()}"
    if get_settings().worker_load_models:
        started = time.perf_counter()
        try:
            get_engine().load_models()
            log.info("models loaded on %s in %.1fs", get_engine().model_device, time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - keep serving; jobs report ModelError, /health shows it
            _state["load_error"] = f"{type(exc).__name__}: {exc}"
            log.exception("model loading failed")
    stop = _state["stop"]
    thread = threading.Thread(target=_heartbeat_loop, args=(stop,), name="heartbeat", daemon=True)
    thread.start()
    _state["thread"] = thread


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def shutdown(**_: Any) -> None:
    _state["stop"].set()
    try:
        store = JobStore.from_settings()
        store.redis.delete(store.key("worker", worker_name()))
    except Exception:  # noqa: BLE001
        log.debug("could not remove heartbeat", exc_info=True)
