"""A Celery worker whose engine, in the first process to run a diarization, holds at its first
progress past 0 (run by tests/test_service_redelivery.py: ``python -m tests._held_engine_worker
<celery worker options>``, with ``HELD_ENGINE_MARKER`` naming a file that does not exist yet).

A test that kills or stops the process running a job must find the job still running when it
does, on a machine of any speed; a recording long enough to promise that on a fast one takes a
slow one minutes to run again in full. Here the first diarization reports its progress, then
reports it again every 0.05 s, as a slow engine would, for at most ``HOLD_S`` (a cancel, a
shutdown or a lost lease reaches the job through those reports, as through the real engine's),
and then goes on. The hold writes the marker first: every later diarization, in this process or
in one started after it (the replacement of a killed pool process), is the real engine at its
own speed. Everything else (the Celery worker, its pool, Redis, the job store, the models) is
real, and so is the first diarization before and after the hold.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from engine.core import Engine

HOLD_S = 120.0
MARKER = Path(os.environ["HELD_ENGINE_MARKER"])
_real_diarize = Engine.diarize


def _diarize(self: Engine, *args, **kwargs):
    report = kwargs.get("progress")
    if report is None or MARKER.exists():
        return _real_diarize(self, *args, **kwargs)

    def progress(step: str, fraction: float) -> None:
        if fraction <= 0 or MARKER.exists():
            report(step, fraction)
            return
        # the marker before the report: a test that sees the progress finds the job held
        MARKER.write_text(str(os.getpid()))
        report(step, fraction)
        until = time.monotonic() + HOLD_S
        while time.monotonic() < until:
            time.sleep(0.05)
            report(step, fraction)

    return _real_diarize(self, *args, **{**kwargs, "progress": progress})


Engine.diarize = _diarize

if __name__ == "__main__":
    from worker.celery_app import app

    app.worker_main(["worker", *sys.argv[1:]])
