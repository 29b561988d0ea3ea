"""A running job's own time limit, proportional to its audio.

Celery's time limits are one figure for every job (``task_soft_time_limit_s``, 3 h: what the
longest audio may need), so an engine that hangs on a 12 s file held its worker for 3 h, and a
solo pool has no time limits at all (for ever). A hang in native code, where no signal handler
runs, was then killed by the hard limit, and the killed job ran again, ``job_max_attempts``
times. Here, once a job's audio is ready, it gets ``job_time_limit_floor_s`` plus
``job_time_limit_per_audio_s`` per second of audio:

* at the limit, SIGALRM raises :class:`JobTimedOut` in the thread running the job (a prefork
  child's and a solo pool's main thread), which fails the job like any error;
* ``job_time_limit_grace_s`` later, if the job still has not stopped, ``on_stuck`` runs in a
  thread of its own: it fails the job and ends the process (``worker.tasks``), as a CUDA context
  that failed does, and the pool starts a fresh one.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable


class JobTimedOut(Exception):
    """Raised in the job's thread when it ran past its time limit."""


class JobDeadline:
    """``with JobDeadline(seconds, grace_s, on_stuck):`` around the engine's work."""

    def __init__(self, seconds: float, grace_s: float, on_stuck: Callable[[], None]) -> None:
        self.seconds, self.grace_s, self.on_stuck = max(seconds, 0.001), grace_s, on_stuck
        # held by on_stuck until the process ends, so a job that ends meanwhile never goes on
        # past __exit__ to record its outcome over the failure on_stuck recorded
        self._lock = threading.Lock()
        self._done = False
        self._previous: Any = None
        self._alarm_set = False
        self._disarmed = False
        self._timer: threading.Timer | None = None

    def _alarm(self, signum: int, frame: Any) -> None:
        # the job ended as the alarm went off: nothing left to stop. Handled on __exit__'s first
        # line, before it disarms, an exception would skip its clean-up, and the grace timer left
        # running would end the process in the middle of a later job
        if self._disarmed or (frame is not None and frame.f_code is JobDeadline.__exit__.__code__):
            return
        raise JobTimedOut(f"past its time limit of {self.seconds:.0f} s")

    def _stuck(self) -> None:
        with self._lock:
            if not self._done:
                self.on_stuck()

    def __enter__(self) -> "JobDeadline":
        # signals reach the main thread only: elsewhere (a threads pool) the grace timer alone holds
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGALRM, self._alarm)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
            self._alarm_set = True
        self._timer = threading.Timer(self.seconds + self.grace_s, self._stuck)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # the alarm fires once; raised on the first line here, it must not skip the clean-up
        # (a grace timer left running would end the process during a later job)
        try:
            self._disarmed = True
        finally:
            if self._alarm_set:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, self._previous)
            with self._lock:
                self._done = True
            if self._timer is not None:
                self._timer.cancel()
