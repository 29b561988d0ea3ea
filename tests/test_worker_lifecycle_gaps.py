"""Gaps in the worker's life cycle, each shown with real Celery worker processes and the session's
Redis (nothing of Celery, billiard or Redis mocked), each failing on the code before its fix:

* a prefork worker whose pool processes keep dying as they load the models (the OOM killer, a
  GPU driver crash; ``tests/_dying_load_worker.py`` SIGKILLs each load 0.3 s in) stopped
  announcing its queues after two deaths, but its main process stayed up for good: Kubernetes and
  compose saw a running container and never restarted it, never backed off, never showed
  CrashLoopBackOff. It now exits with status 1 after ``worker_max_load_deaths`` (3) deaths in a
  row, saying why in a critical log line; a worker whose load *raises* (``load_error``) stays up
  and answers 503 as before.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tests.test_hostile_round13_lifecycle import NO_MODELS, _wait  # noqa: F401

DEATH = "exited with 'signal 9 (SIGKILL)'"


def _spawn(base: Any, name: str, app: str, queue: str, env: dict[str, str], concurrency: int = 1) -> Any:
    """The production command line (``celery -A <app> worker``, as the images run it) for ``app``."""
    from cli.launcher import Stack

    stack = Stack(log_dir=base)
    proc = stack.spawn(name, [
        sys.executable, "-m", "celery", "-A", app, "worker", "--pool", "prefork", "--concurrency", str(concurrency), "-Q", queue,
        "-n", f"{name}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ], env=env)
    return stack, proc, base / f"{name}.log"


def test_a_worker_whose_pool_processes_keep_dying_as_they_load_exits_non_zero(service_env, settings, tmp_path_factory):
    """Each pool process is SIGKILLed 0.3 s into its load. The worker's main process exits with
    status 1 after the third death, with a critical line saying why, and leaves no heartbeat or
    queue announced behind it. Before, it never exited (checked: still up after 12 deaths)."""
    from shared.jobs import JobStore

    store = JobStore.from_settings(settings)
    queue = "audio-gaps-dying"
    stack, proc, log = _spawn(tmp_path_factory.mktemp("gaps-dying"), "gapsdying", "tests._dying_load_app", queue,
                              {"AUDIO_ANALYSIS_QUEUE_NAME": queue})
    try:
        started, gave_up = time.monotonic(), 0.0
        # a death every 1-5 s here; 120 s leaves a loaded CI host room, and the old code never exited
        while proc.poll() is None:
            text = log.read_text(errors="replace") if log.exists() else ""
            if not gave_up and "stopping the worker with exit status 1" in text:
                gave_up = time.monotonic()
            assert time.monotonic() - started < 120, \
                f"the worker is still up after {text.count(DEATH)} of its pool processes died loading"
            time.sleep(0.2)
        text = log.read_text(errors="replace")
        print(f"\nworker exited {proc.returncode} {time.monotonic() - started:.1f} s after its start, after "
              f"{text.count(DEATH)} load deaths, {time.monotonic() - (gave_up or started):.1f} s after it gave up")
        assert proc.returncode == 1, text[-3000:]
        assert text.count(DEATH) == 3, text[-3000:]
        assert "died 3 times in a row while loading the models" in text and "CRITICAL" in text, text[-3000:]
        # gone from /health and from the queue's consumers: synchronous calls get their 503
        assert not [w for w in store.workers() if w["worker"].startswith("gapsdying@")]
        _wait(lambda: not store.redis.exists(store.consumers_key(queue)), 20, "the queue is still announced")
    finally:
        stack.stop()


def test_a_worker_whose_load_raises_stays_up_with_its_load_error(service_env, settings, tmp_path_factory):
    """The load raises (no weights, no GPU): the pool process lives on with its load_error, which
    /health shows and synchronous calls are answered 503 for at once; the worker must not exit
    (nothing died, and a restart would fail the same way)."""
    from shared.jobs import JobStore

    store = JobStore.from_settings(settings)
    queue = "audio-gaps-raising"
    stack, proc, log = _spawn(tmp_path_factory.mktemp("gaps-raising"), "gapsraising", "tests._raising_load_app",
                              queue, {"AUDIO_ANALYSIS_QUEUE_NAME": queue})
    try:
        def beat() -> list[dict[str, Any]]:
            return [w for w in store.workers() if w["worker"].startswith("gapsraising@") and w.get("load_error")]

        _wait(lambda: bool(beat()) or proc.poll() is not None, 60, "no heartbeat with a load_error", step=0.2)
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert "no weights here" in beat()[0]["load_error"]
        time.sleep(3)  # several heartbeats (1 s)
        assert proc.poll() is None and beat(), log.read_text(errors="replace")[-3000:]
    finally:
        stack.stop()
