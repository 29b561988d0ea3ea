"""Round 13 of the job life cycle under attack: real Celery worker processes (solo pool, as the
earlier rounds' rigs; no models where the job ends at its audio by URL), the session's Redis, the
API in process (TestClient), SIGKILL at chosen moments.

Each test fails on the code before its fix:

* a worker killed (SIGKILL, the OOM killer, a container's memory limit) while it held the
  retry of a job whose submission the API had not confirmed yet (an idle worker takes a message
  the moment it is sent; a batch's first jobs wait for its last file's message; the worker waits
  0.5 s, then holds the message as a Celery retry for up to 5 s) took the job's only message
  with it: unacked in Redis, where the broker hands it out again only after its visibility
  timeout (6 h). The job was confirmed (202) and stayed "queued" all that time; nothing looked
  for it, as the recovery pass looks only at running jobs. Such a hold now has a due time in
  Redis (``JobStore.hold_message``), and each worker's recovery pass sends the job's message
  again once it passed (worker/recovery.py ``recover_held_jobs``).
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any, Iterator

import pytest

from tests.conftest import wait_for_job
from tests.test_queued_records import _start_worker, _wait_for_log

HELD_QUEUE = "audio-r13-held"
# no models (every job here ends at its audio by URL), 2 s leases and a recovery pass every second
NO_MODELS = {"AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false", "AUDIO_ANALYSIS_JOB_LEASE_S": "2",
             "AUDIO_ANALYSIS_JOB_RECOVERY_INTERVAL_S": "1"}


def _store(settings: Any):
    from shared.jobs import JobStore

    return JobStore.from_settings(settings)


@contextlib.contextmanager
def _api(settings: Any, queue: str) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(settings.model_copy(update={"queue_name": queue})),
                    raise_server_exceptions=False) as client:
        yield client


_worker = contextlib.contextmanager(_start_worker)


def _wait(predicate, timeout_s: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(step)


def _queued_messages(store: Any, queue: str) -> int:
    from shared.queue import queue_keys

    return sum(store.redis.llen(key) for key in queue_keys(queue))


def test_a_worker_killed_while_it_holds_an_unconfirmed_jobs_retry_leaves_the_job_to_run(
        service_env, settings, media_server, tmp_path_factory, monkeypatch):
    """The API sends the job's message and is slow to confirm it (a batch's first jobs wait for its
    last file's message); the idle worker takes the message, waits its 0.5 s for the confirmation
    and holds the message as a retry, and is SIGKILLed then. The API confirms: 202. Another worker
    starts: the job must run (here: fail at its URL's 404, attempt 1), not wait 6 h "queued" for
    the broker's visibility timeout."""
    import api.dispatch

    store = _store(settings)
    base = tmp_path_factory.mktemp("r13-held")
    env = {"AUDIO_ANALYSIS_QUEUE_NAME": HELD_QUEUE, **NO_MODELS}
    url = media_server.file("/r13/held.wav", b"gone", status=404)
    send = api.dispatch.send_job
    killed: list[float] = []
    try:
        with _api(settings, HELD_QUEUE) as client:
            with _worker(base, "r13held1", HELD_QUEUE, env) as first:
                def send_then_lose_the_worker(*args: Any, **kwargs: Any) -> None:
                    send(*args, **kwargs)
                    # the worker took the message, waited for the confirmation, and now holds it
                    # as a retry (back from the queue into the worker's hands)
                    _wait_for_log(first, "its submission is not confirmed yet", timeout_s=30)
                    _wait(lambda: _queued_messages(store, HELD_QUEUE) == 0, 10, "the retry was not taken back")
                    time.sleep(0.3)  # the consumer has it: received, acknowledged to nobody
                    first.proc.send_signal(signal.SIGKILL)
                    first.proc.wait(10)
                    killed.append(time.monotonic())

                monkeypatch.setattr(api.dispatch, "send_job", send_then_lose_the_worker)
                r = client.post("/jobs/embedding", data={"file_url": url})
                monkeypatch.setattr(api.dispatch, "send_job", send)
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            assert killed, "the worker was not killed"
            assert store.get(job_id).status == "queued"
            with _worker(base, "r13held2", HELD_QUEUE, env):
                done = wait_for_job(client, job_id, timeout_s=30)
            print(f"\njob ran {time.monotonic() - killed[0]:.1f} s after its worker was killed")
            # it ran, once: its audio's URL answered 404
            assert done["status"] == "failed" and done["attempts"] == 1, done
            assert done["error"]["status_code"] == 422 and "404" in done["error"]["detail"], done["error"]
    finally:
        store.redis.delete(*__import__("shared.queue", fromlist=["queue_keys"]).queue_keys(HELD_QUEUE))
