"""A Celery worker whose engine holds a job's first diarization at its first progress past 0
(run by tests/test_service_redelivery.py, tests/test_recovery.py and tests/test_storage_s3.py: ``python -m
tests._held_engine_worker <celery worker options>``).

A test that kills or stops the process running a job, or the Redis it reports to, must find the
job still running when it does, on a machine of any speed; a recording long enough to promise
that on a fast one takes a slow one minutes to run again in full. Here a held diarization
reports its progress, then reports it again every 0.05 s, as a slow engine would, for at most
``HOLD_S`` (120 s, or ``HELD_ENGINE_HOLD_S``; a cancel, a shutdown, a lost lease or an
unreachable Redis reaches the job through those reports, as through the real engine's), and then
goes on as the real engine.

Which diarization holds: with ``HELD_ENGINE_MARKER`` (a file that does not exist yet), the
first one in any process (the hold writes the file); with ``HELD_ENGINE_MARKERS`` (a folder),
the first one of each job (its upload's folder names it; the hold writes a file named after it
there). The marker is written before the held report, so a test that has seen the progress
finds it. Every other diarization, in this process or in one started after it (the replacement
of a killed process, another worker), is the real engine at its own speed. Everything else (the
Celery worker, its pool, Redis, the job store, the models) is real, and so is the held
diarization before and after the hold.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from engine.core import Engine

# HELD_ENGINE_HOLD_S: a hold of a set length, for a test that needs a job to run that long
HOLD_S = float(os.environ.get("HELD_ENGINE_HOLD_S", "120"))
_real_diarize = Engine.diarize


def _marker(source: object) -> Path | None:
    if os.environ.get("HELD_ENGINE_MARKER"):
        return Path(os.environ["HELD_ENGINE_MARKER"])
    if os.environ.get("HELD_ENGINE_MARKERS") and isinstance(source, (str, os.PathLike)):
        return Path(os.environ["HELD_ENGINE_MARKERS"]) / Path(source).parent.name
    return None


def _diarize(self: Engine, source, *args, **kwargs):
    report = kwargs.get("progress")
    marker = _marker(source)
    if report is None or marker is None or marker.exists():
        return _real_diarize(self, source, *args, **kwargs)

    def progress(step: str, fraction: float) -> None:
        if fraction <= 0 or marker.exists():
            report(step, fraction)
            return
        # the marker before the report: a test that sees the progress finds the job held
        marker.write_text(str(os.getpid()))
        report(step, fraction)
        until = time.monotonic() + HOLD_S
        while time.monotonic() < until:
            time.sleep(0.05)
            report(step, fraction)

    return _real_diarize(self, source, *args, **{**kwargs, "progress": progress})


Engine.diarize = _diarize

if __name__ == "__main__":
    from worker.celery_app import app

    app.worker_main(["worker", *sys.argv[1:]])
