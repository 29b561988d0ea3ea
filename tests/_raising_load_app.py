"""The service's Celery app whose model load raises (``celery -A tests._raising_load_app worker
...``; tests/test_worker_lifecycle_gaps.py): what a missing weight file or a CUDA device asked for
where none is does. The pool process stays up with its ``load_error``; everything else (the Celery
worker, its heartbeat, Redis) is real."""

from __future__ import annotations

import time

from engine.core import Engine
from worker.celery_app import app

__all__ = ["app"]


def _raise_loading(self: Engine, *args: object, **kwargs: object) -> None:
    time.sleep(0.2)
    raise RuntimeError("no weights here (tests._raising_load_app)")


Engine.load_models = _raise_loading  # type: ignore[method-assign]
