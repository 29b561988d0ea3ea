"""A Celery worker whose first job holds in the worker's header check of its first file, until
the test lets it go (run by tests/test_hostile_round17b_api.py: ``python -m
tests._held_probe_worker <celery worker options>``).

A job with several files (compare) reads each file's header before the engine starts; a cancel
that comes meanwhile removes the job's uploads at once, and the files not read yet are gone when
the worker reaches them. On local storage that window is milliseconds; here the first header
check writes ``HELD_PROBE_MARKER`` and waits (at most 60 s) until ``HELD_PROBE_RELEASE`` exists,
so a test can cancel the job inside it on a machine of any speed. Everything else (the Celery
worker, Redis, the job store, the storage, the header check itself, the engine) is real.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import worker.tasks as tasks

_real_check = tasks.check_audio_limits


def _held_check(*args, **kwargs):
    marker, release = os.environ.get("HELD_PROBE_MARKER"), os.environ.get("HELD_PROBE_RELEASE")
    if marker and release and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        until = time.monotonic() + 60
        while not Path(release).exists() and time.monotonic() < until:
            time.sleep(0.05)
    return _real_check(*args, **kwargs)


tasks.check_audio_limits = _held_check

if __name__ == "__main__":
    from worker.celery_app import app

    app.worker_main(["worker", *sys.argv[1:]])
