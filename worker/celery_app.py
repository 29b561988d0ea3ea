"""The worker's Celery application (``celery -A worker.celery_app worker``): the one in
shared/queue.py with the task code included and the worker's signal handlers registered."""

from __future__ import annotations

from shared.queue import make_celery

app = make_celery(include=["worker.tasks"])

# make `celery -A worker.celery_app` find the signal handlers
import worker.lifecycle  # noqa: E402,F401
