"""The service's Celery app with ``tests/_dying_load_worker.py``'s load (each pool process SIGKILLs
itself 0.3 s into loading the models), for the production command line itself:
``celery -A tests._dying_load_app worker ...``, whose exit status is the worker's (``app.worker_main``
returns it to nobody, so a script that calls it exits 0 whatever the worker said)."""

from __future__ import annotations

import tests._dying_load_worker  # noqa: F401 - patches the engine's load
from worker.celery_app import app

__all__ = ["app"]
