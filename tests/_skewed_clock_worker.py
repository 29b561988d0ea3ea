"""A Celery worker whose clock is wrong by ``SKEWED_CLOCK_S`` seconds (ahead; negative: behind),
as on a host without NTP or a VM resumed with a stale clock (run by
tests/test_hostile_round8_lifecycle.py: ``python -m tests._skewed_clock_worker <celery worker
options>``).

Only ``time.time`` (the wall clock every module reads through ``time.time()``) is moved, before
anything else is imported; the monotonic clock, which no other process sees, is left alone.
Everything else (Celery, its pool, Redis, the job store, the models) is real.
"""

from __future__ import annotations

import os
import sys
import time

_wall = time.time
_SKEW_S = float(os.environ["SKEWED_CLOCK_S"])
time.time = lambda: _wall() + _SKEW_S

if __name__ == "__main__":
    from worker.celery_app import app

    app.worker_main(["worker", *sys.argv[1:]])
