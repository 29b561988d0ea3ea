"""A Celery worker whose engine hangs on request (run by tests/test_hostile_lifecycle.py:
``python -m tests._hanging_engine_worker <celery worker options>``).

No input known today makes the engine hang, so the hang is simulated where it would be, and only
there: ``Engine.diarize`` with ``num_speakers=97`` loops in Python for ever (what a soft time
limit can stop), with ``num_speakers=98`` it waits in C, in ``pause()`` with SIGALRM and SIGUSR1 blocked (a
hang in native code, where no signal handler runs: only ending the process stops it). Any other job runs
the real engine. Everything else (the Celery worker, its pool, Redis, the job store, the models)
is real.
"""

from __future__ import annotations

import ctypes
import signal
import sys
import time

from engine.core import Engine

PYTHON_HANG, NATIVE_HANG = 97, 98
_real_diarize = Engine.diarize


def _diarize(self: Engine, *args, **kwargs):
    if kwargs.get("num_speakers") == PYTHON_HANG:
        while True:
            time.sleep(0.05)
    if kwargs.get("num_speakers") == NATIVE_HANG:
        # in C, never back in the interpreter, which is where Python runs signal handlers: a
        # signal the kernel hands another thread leaves pause() waiting
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGUSR1})
        libc = ctypes.CDLL(None)
        while True:
            libc.pause()
    return _real_diarize(self, *args, **kwargs)


Engine.diarize = _diarize

if __name__ == "__main__":
    from worker.celery_app import app

    app.worker_main(["worker", *sys.argv[1:]])
