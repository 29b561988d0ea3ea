"""A Celery worker that dies at the moment a warm shutdown hands its running job back, just as
it would send the job's new queue message (run by tests/test_recovery.py: ``python -m
tests._handback_crash_worker <celery worker options>``).

What is simulated is only the death itself (a host lost, an OOM kill, a second SIGKILL from an
impatient supervisor) at that one point: ``worker.tasks._enqueue`` exits the process instead of
sending. The worker, its shutdown, Redis, the job store, the models and the job are real; with
``HELD_ENGINE_MARKERS`` set, as tests/test_recovery.py sets it, a job's first run holds at its
first progress (tests/_held_engine_worker.py), so the shutdown lands mid-job on any machine.
"""

from __future__ import annotations

import os
import sys

import tests._held_engine_worker  # noqa: F401 - the hold, where its variables ask for it
import worker.tasks


def _die(*_args, **_kwargs) -> None:
    os._exit(1)


worker.tasks._enqueue = _die

if __name__ == "__main__":
    from worker.celery_app import app

    app.worker_main(["worker", *sys.argv[1:]])
