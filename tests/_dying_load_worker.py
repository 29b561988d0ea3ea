"""A Celery worker whose pool processes die while they load the models (``python -m
tests._dying_load_worker <celery worker options>``; tests/test_hostile_round13_lifecycle.py).

What the OOM killer does to a pool process whose models do not fit in the memory left, or a GPU
driver that crashes as it starts: here each load, ``DYING_LOAD_AFTER_S`` (0.3 s) in, sends its
own process SIGKILL. Everything else (the Celery worker, its prefork parent replacing each dead
pool process, the heartbeat thread, Redis) is real.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from engine.core import Engine


def _die_loading(self: Engine, *args: object, **kwargs: object) -> None:
    time.sleep(float(os.environ.get("DYING_LOAD_AFTER_S", "0.3")))
    os.kill(os.getpid(), signal.SIGKILL)


Engine.load_models = _die_loading  # type: ignore[method-assign]

if __name__ == "__main__":
    from worker.celery_app import app

    app.worker_main(["worker", *sys.argv[1:]])
