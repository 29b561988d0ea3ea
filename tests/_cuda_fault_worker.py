"""A Celery worker whose engine meets a sticky CUDA failure in its first job (run by
tests/test_worker_device.py: ``python -m tests._cuda_fault_worker <celery worker options>``).

This machine has no GPU, so the failure is simulated where it surfaces, and only there: the first
job's ``Engine.diarize`` raises what a device-side assert raises, and from then on that process's
``Engine.device_works()`` says False, as a real CUDA context that failed stays failed. A process
started after it (the marker file exists) works, as a fresh context would. Everything else (the
Celery worker, its pool, Redis, the job store, the models) is real.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from engine.core import Engine

MARKER = Path(os.environ["CUDA_FAULT_MARKER"])
_real_diarize = Engine.diarize
_failed: list[bool] = []


def _diarize(self: Engine, *args, **kwargs):
    if not MARKER.exists():
        MARKER.write_text(str(os.getpid()))
        _failed.append(True)
        raise RuntimeError("CUDA error: device-side assert triggered")
    return _real_diarize(self, *args, **kwargs)


Engine.diarize = _diarize
Engine.device_works = lambda self: not _failed

if __name__ == "__main__":
    from worker.celery_app import app

    app.worker_main(["worker", *sys.argv[1:]])
