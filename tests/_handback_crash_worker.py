"""A Celery worker that dies at the moment a warm shutdown hands its running job back, just as
it would send the job's new queue message (run by tests/test_recovery.py: ``python -m
tests._handback_crash_worker <celery worker options>``).

What is simulated is only the death itself (a host lost, an OOM kill, a second SIGKILL from an
impatient supervisor) at that one point: ``worker.tasks._enqueue`` exits the process instead of
sending. The worker, its shutdown, Redis, the job store, the models and the job are real.

So that the shutdown lands mid-job on any machine without a recording that takes minutes to
diarize (the job runs again, in full, on the worker that rescues it), the engine here holds at
its first progress past 0, reporting that progress again every 0.05 s, as a slow engine would,
for at most ``HOLD_S``; the shutdown reaches the job through that report, as it does through
the real engine's, and the real engine then goes on.
"""

from __future__ import annotations

import os
import sys
import time

import worker.tasks
from engine.core import Engine

HOLD_S = 120.0
_real_diarize = Engine.diarize


def _die(*_args, **_kwargs) -> None:
    os._exit(1)


def _diarize(self: Engine, *args, **kwargs):
    report = kwargs.get("progress")
    if report is None:
        return _real_diarize(self, *args, **kwargs)
    held = [False]

    def progress(step: str, fraction: float) -> None:
        report(step, fraction)
        if fraction > 0 and not held[0]:
            held[0] = True
            until = time.monotonic() + HOLD_S
            while time.monotonic() < until:
                time.sleep(0.05)
                report(step, fraction)

    return _real_diarize(self, *args, **{**kwargs, "progress": progress})


worker.tasks._enqueue = _die
Engine.diarize = _diarize

if __name__ == "__main__":
    from worker.celery_app import app

    app.worker_main(["worker", *sys.argv[1:]])
