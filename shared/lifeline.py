"""A child of ``audio-analysis up`` (or of the tests' stack) ends when the process that started it
is gone.

``cli.launcher.Stack`` starts the worker, the API and Flower in their own sessions, so that a
Ctrl-C reaches the launcher alone and it stops them in order. The other side of that: a launcher
killed outright (SIGKILL, the OOM killer, a CI runner cancelling a test run) left them running,
orphaned. A worker left so kept its GPU memory and went on consuming the queue, with a storage
directory nobody else read: the next run on that Redis database lost jobs to it ("no longer in
storage") and its synchronous calls found "no worker". The kernel's parent-death signal
(``PR_SET_PDEATHSIG``) would need ``preexec_fn``, unsafe in a process with threads, and fires
when the spawning *thread* ends, not the process; so the child watches instead: the launcher
names itself in :data:`PARENT_ENV`, and the child, once its parent is no longer its parent, ends
itself as a stop would (SIGTERM: a worker hands its job back), then for good after a grace.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

PARENT_ENV = "AUDIO_ANALYSIS_PARENT_PID"
# how often the parent is looked for (one getppid, no I/O), and how long a SIGTERM has to end
# the process before SIGKILL (Stack.stop gives its children 20 s)
POLL_S = 1.0
GRACE_S = 30.0


def follow_parent(poll_s: float = POLL_S, grace_s: float = GRACE_S) -> bool:
    """Watch the parent :data:`PARENT_ENV` names, from a daemon thread; False (and nothing
    watched) when the variable is not set. The variable is taken out of the environment, so that
    this process's own children (FFmpeg, a pool process, a uvicorn worker) do not watch a parent
    that is not theirs."""
    raw = os.environ.pop(PARENT_ENV, "")
    try:
        parent = int(raw)
    except ValueError:
        return False
    if parent <= 1:
        return False
    threading.Thread(target=_watch, args=(parent, poll_s, grace_s), name="parent-watch", daemon=True).start()
    return True


def _watch(parent: int, poll_s: float, grace_s: float) -> None:
    # re-parented (to init or a subreaper) once the parent has died; checked at once too, for a
    # parent that died while this process was starting
    while os.getppid() == parent:
        time.sleep(poll_s)
    log.warning("the process that started this one (pid %d) is gone: stopping", parent)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    log.error("still running %.0f s after the stop: killed", grace_s)
    os.kill(os.getpid(), signal.SIGKILL)
