"""The job life cycle where a hostile or unlucky input meets real worker processes: real Redis,
the API in-process, real Celery workers (the session's, and workers of this module's own).

Each test fails on the code before its fix:

* a job whose engine hangs (an input that sends a model or a decoder into a loop) held its worker
  for Celery's fixed time limit of 3 h whatever its audio, and for ever under a solo pool, which
  has no time limits; a hang in native code was killed at 3 h 5 min and then run again, three
  times (9 h of a GPU for 12 s of audio). A job now has a time limit of its own, proportional to
  its audio (worker/deadline.py), and fails with a 504 saying so.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterator

import pytest

from tests.conftest import gone, wait_for_job

HANG_QUEUE = "audio-hanging"


@pytest.fixture(scope="module")
def hanging_worker(worker, settings, tmp_path_factory) -> Iterator[Any]:
    """A prefork worker (what compose and Kubernetes run) whose engine hangs on request
    (tests/_hanging_engine_worker.py), with a job time limit of 2 s plus 0.25 s per second of
    audio (5 s for the 12 s sample, which the real engine diarizes in under 1 s) and 1.5 s of
    grace before a stuck process is ended."""
    from cli.launcher import Stack, wait_until
    from shared.jobs import JobStore

    store = JobStore.from_settings(settings)
    log_dir = tmp_path_factory.mktemp("hanging-logs")
    stack = Stack(log_dir=log_dir)

    def ready() -> bool:
        return any(w["worker"].startswith("hanging@") and w["diarization_model_loaded"] for w in store.workers())

    try:
        proc = stack.spawn("hanging", [
            sys.executable, "-m", "tests._hanging_engine_worker", "--pool", "prefork", "--concurrency", "1",
            "-Q", HANG_QUEUE, "-n", "hanging@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        ], env={"AUDIO_ANALYSIS_JOB_TIME_LIMIT_FLOOR_S": "2", "AUDIO_ANALYSIS_JOB_TIME_LIMIT_PER_AUDIO_S": "0.25",
                "AUDIO_ANALYSIS_JOB_TIME_LIMIT_GRACE_S": "1.5"})
        wait_until(ready, 180, "prefork worker with a hanging engine", proc)
        proc.log_path = log_dir / "hanging.log"  # type: ignore[attr-defined]
        yield proc
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def hang_client(hanging_worker, settings) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(settings.model_copy(update={"queue_name": HANG_QUEUE})),
                    raise_server_exceptions=False) as client:
        yield client


def _submit(client, path, short_sample, **data: str) -> Any:
    return client.post(path, files={"file": (short_sample.name, short_sample.read_bytes(), "audio/wav")}, data=data)


def test_a_job_whose_engine_hangs_fails_at_a_limit_proportional_to_its_audio(
        hanging_worker, hang_client, settings, short_sample, webhook_receiver):
    """12 s of audio whose diarization never ends, in Python and in native code where no signal
    reaches: each fails in seconds with a 504 that says why (a sync caller gets it as its answer),
    its upload is deleted and its webhook sent, it is not run again, and the worker goes on with
    the next job (before: 3 h per attempt, and a solo worker for ever)."""
    from tests._hanging_engine_worker import NATIVE_HANG, PYTHON_HANG

    storage = settings.storage_dir
    # the synchronous contract: the caller's answer is the job's error, in the documented shape
    started = time.monotonic()
    r = _submit(hang_client, "/diarize", short_sample, num_speakers=str(PYTHON_HANG))
    waited = time.monotonic() - started
    assert r.status_code == 504, r.text
    body = r.json()
    assert body["error_type"] == "ProcessingError" and "time limit of 5 s" in body["detail"], body
    assert "12 s of audio" in body["detail"], body
    assert waited < 60, waited

    # a hang where no signal handler runs: the process is ended, the job stays failed
    hook = webhook_receiver.url("/hang-native")
    job = _submit(hang_client, "/jobs/diarize", short_sample, num_speakers=str(NATIVE_HANG), webhook_url=hook).json()
    done = wait_for_job(hang_client, job["job_id"], timeout_s=90)
    assert done["status"] == "failed" and done["error"]["status_code"] == 504, done
    assert "time limit of 5 s" in done["error"]["detail"], done
    assert gone(storage / job["job_id"]), "the upload of a job stopped at its limit stays"
    deadline = time.monotonic() + 30
    while not webhook_receiver.for_path("/hang-native") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(webhook_receiver.for_path("/hang-native")) == 1

    # the worker carries on (a fresh pool process), and the stopped job is not run again
    ok = _submit(hang_client, "/jobs/diarize", short_sample).json()
    assert wait_for_job(hang_client, ok["job_id"], timeout_s=180)["status"] == "succeeded"
    again = hang_client.get(f"/jobs/{job['job_id']}").json()
    assert again["status"] == "failed" and again["attempts"] == 1, again
    assert hanging_worker.poll() is None, "the worker's main process must survive its stuck child"
    log = hanging_worker.log_path.read_text(errors="replace")
    assert "stuck past its time limit" in log


def test_the_deadline_stops_a_python_loop_and_calls_on_stuck_only_for_a_job_that_did_not_stop():
    """worker/deadline.py on its own, in this (main) thread: no worker, no Redis."""
    import signal
    import threading

    from worker.deadline import JobDeadline, JobTimedOut

    stuck: list[float] = []
    before = signal.getsignal(signal.SIGALRM)
    started = time.monotonic()
    with pytest.raises(JobTimedOut):
        with JobDeadline(0.3, 0.3, lambda: stuck.append(time.monotonic())):
            while True:
                time.sleep(0.01)
    assert 0.25 < time.monotonic() - started < 2
    time.sleep(0.6)
    assert not stuck, "a job that stopped at its limit must not have its process ended"
    assert signal.getsignal(signal.SIGALRM) is before

    # a job ending in time: nothing fires later
    with JobDeadline(0.2, 0.2, lambda: stuck.append(time.monotonic())):
        pass
    time.sleep(0.6)
    assert not stuck

    # the job is stuck in C with the alarm blocked (native code, where Python runs no handler):
    # the grace timer calls on_stuck (which here lets the test's pause() return)
    import ctypes

    called = threading.Event()
    main = threading.main_thread().ident

    def on_stuck() -> None:
        called.set()
        signal.pthread_kill(main, signal.SIGUSR2)

    usr2 = signal.signal(signal.SIGUSR2, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        with JobDeadline(0.2, 0.2, on_stuck):
            ctypes.CDLL(None).pause()
    except JobTimedOut:
        pass  # back in Python: the alarm's handler ran, when another thread had taken the signal
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        # an alarm no thread took is still pending: taken here, or unblocking it would deliver
        # it to the default action, which ends pytest
        signal.sigtimedwait({signal.SIGALRM}, 0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
        signal.signal(signal.SIGUSR2, usr2)
    assert called.is_set(), "on_stuck never ran"
    assert signal.getsignal(signal.SIGALRM) is before


def test_an_alarm_as_the_deadline_is_left_does_not_skip_its_clean_up():
    """The alarm handled on ``__exit__``'s first line, before it disarms: raised there, it skipped
    the clean-up, and the grace timer left running ended the process in the middle of the next
    job. The handler is called with the frame it interrupts."""
    import signal
    from types import SimpleNamespace

    from worker.deadline import JobDeadline, JobTimedOut

    stuck: list[float] = []
    deadline = JobDeadline(30, 0.2, lambda: stuck.append(time.monotonic()))
    with deadline:
        # the alarm lands on __exit__'s first line: ignored
        deadline._alarm(signal.SIGALRM, SimpleNamespace(f_code=JobDeadline.__exit__.__code__))
        # anywhere in the job: the job stops
        with pytest.raises(JobTimedOut):
            deadline._alarm(signal.SIGALRM, sys._getframe())
    time.sleep(0.5)
    assert not stuck


def test_a_time_limit_while_decoding_threads_wind_down_waits_for_them():
    """The job's alarm (a JobTimedOut raised in the main thread) arriving while the parallel
    decoder waits for its threads after an error: raised there, the caller closed libsndfile
    handles a thread was still reading, which can crash the process. The threads finish first."""
    import signal
    import threading

    from engine import audio
    from worker.deadline import JobTimedOut

    finished = threading.Event()

    def decode(handle: object, index: int):
        if index == 0:
            raise ValueError("a damaged block")
        time.sleep(0.5)
        finished.set()
        return 0, False

    def alarm(*_: object) -> None:
        raise JobTimedOut("past its time limit")

    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.15)
        with pytest.raises((JobTimedOut, ValueError)):
            audio._blocks_in_order([object(), object()], 2, decode, audio._Collector(60))
        assert finished.is_set(), "returned while a decoding thread still held its handle"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
