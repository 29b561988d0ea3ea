"""A queued job whose Celery message is nowhere is sent again, once (worker/recovery.py,
``recover_unqueued_jobs``).

kombu's Redis transport takes a message with BRPOP and only then, from the worker, writes it to its
unacked set: a connection cut in between (a stall past the socket timeout, a worker host lost at
that moment, a proxy) leaves the message nowhere, as does a flushed queue or a failover that lost
the list's last writes. The job's record said "queued" for a day and nothing ever ran it.

Real parts: the session's Redis, the API in process, a real Celery worker process (solo, no models:
each job ends at its audio's URL, which answers 404 and counts its requests), keys and queues of
this module's own. Jobs are submitted while no worker consumes; the message of one job per queue is
taken out of the broker's list as a lost BRPOP reply leaves it; the worker then starts with a
recovery pass every second and jobs looked at once queued a second. The lost jobs run once; the
jobs whose message is there (one consumed, one waiting on a queue nobody consumes) are never sent
again. Without the pass, the lost job stays queued and the test fails at its wait.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.conftest import drop_namespace, wait_for_job

PREFIX = "aa-unqueued"
QUEUE, IDLE_QUEUE, HOOKS = "audio-unqueued", "audio-unqueued-idle", "webhooks-unqueued"
WORKER_ENV = {
    "AUDIO_ANALYSIS_REDIS_KEY_PREFIX": PREFIX, "AUDIO_ANALYSIS_QUEUE_NAME": QUEUE,
    "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": HOOKS, "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false",
    "AUDIO_ANALYSIS_JOB_LEASE_S": "2", "AUDIO_ANALYSIS_JOB_RECOVERY_INTERVAL_S": "1",
    "AUDIO_ANALYSIS_JOB_UNQUEUED_AFTER_S": "1",
}


def _wait(predicate, timeout_s: float, what: Any, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(step)


def _ids(store: Any, queue: str) -> list[str]:
    from shared.queue import queue_keys

    return sorted(json.loads(raw)["headers"]["id"]
                  for key in queue_keys(queue) for raw in store.redis.lrange(key, 0, -1))


def _lose(store: Any, queue: str, job_id: str) -> None:
    """Take the job's message out of the broker, as a BRPOP whose reply never reached its worker."""
    from shared.queue import queue_keys

    removed = 0
    for key in queue_keys(queue):
        for raw in store.redis.lrange(key, 0, -1):
            if json.loads(raw)["headers"]["id"] == job_id:
                removed += store.redis.lrem(key, 1, raw)
    assert removed == 1, removed


def test_a_job_whose_message_was_lost_runs_once_and_no_present_message_is_sent_again(
        service_env, settings, media_server, tmp_path_factory):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from cli.launcher import Stack
    from shared.jobs import JobStore
    from shared.queue import queue_keys

    mine = settings.model_copy(update={"redis_key_prefix": PREFIX, "queue_name": QUEUE, "webhook_queue_name": HOOKS})
    store = JobStore.from_settings(mine)
    paths = {name: f"/unqueued/{name}.wav" for name in ("lost", "there", "idle", "idle-lost")}
    urls = {name: media_server.file(path, b"gone", status=404) for name, path in paths.items()}
    stack = Stack(log_dir=tmp_path_factory.mktemp("unqueued"))
    try:
        jobs: dict[str, str] = {}
        for queue, names in ((QUEUE, ("lost", "there")), (IDLE_QUEUE, ("idle", "idle-lost"))):
            with TestClient(create_app(mine.model_copy(update={"queue_name": queue})),
                            raise_server_exceptions=False) as api:
                for name in names:
                    r = api.post("/jobs/embedding", data={"file_url": urls[name]})
                    assert r.status_code == 202, r.text
                    jobs[name] = r.json()["job_id"]
        assert _ids(store, QUEUE) == sorted([jobs["lost"], jobs["there"]])
        _lose(store, QUEUE, jobs["lost"])
        _lose(store, IDLE_QUEUE, jobs["idle-lost"])
        assert _ids(store, IDLE_QUEUE) == [jobs["idle"]]

        stack.start_worker(queues=[QUEUE], name="unqueued", env=WORKER_ENV)
        log = stack.log_dir / "unqueued.log"
        with TestClient(create_app(mine), raise_server_exceptions=False) as api:
            # a pass notes the lost job's message missing, the next (a second on) sends it again
            done = {name: wait_for_job(api, jobs[name], timeout_s=45) for name in ("there", "lost")}
        for name, record in done.items():
            # each ran, once: its URL answered 404 on attempt 1, and was asked once
            assert record["status"] == "failed" and record["attempts"] == 1, (name, record)
            assert record["error"]["status_code"] == 422 and "404" in record["error"]["detail"], record["error"]
            assert len(media_server.for_path(paths[name])) == 1, name
        # the job queued on a queue no worker of this test consumes: its lost message is sent again
        # there (all queues the job store knows), beside the one that was never lost
        both = sorted([jobs["idle"], jobs["idle-lost"]])
        _wait(lambda: _ids(store, IDLE_QUEUE) == both, 20, lambda: (_ids(store, IDLE_QUEUE), both))

        # and never again, however many passes read the queues on: two more, seen by the pass's lock
        # (it lives an interval from each pass that reads the queues)
        lock, scans, last = store.key("unqueued", "scan"), 0, store.redis.pttl(store.key("unqueued", "scan"))

        def scanned() -> bool:
            nonlocal scans, last
            now = store.redis.pttl(lock)
            if now > 0 and (last <= 0 or now > last + 50):
                scans += 1
            last = now
            return scans >= 3

        _wait(scanned, 20, lambda: f"only {scans} passes read the queues", step=0.02)
        assert _ids(store, IDLE_QUEUE) == both
        text = log.read_text(errors="replace")
        for name in ("lost", "idle-lost"):
            assert text.count(f"job {jobs[name]}: queued") == 1, (name, text[-3000:])
        for name in ("there", "idle"):
            assert f"job {jobs[name]}: queued" not in text, (name, text[-3000:])
        assert store.get(jobs["idle"]).status == "queued" and store.get(jobs["idle-lost"]).attempts == 0
    finally:
        stack.stop()
        drop_namespace(settings.redis_url, PREFIX, *queue_keys(QUEUE), *queue_keys(IDLE_QUEUE), *queue_keys(HOOKS))


def test_a_message_missing_on_one_pass_only_is_not_sent_again(service_env, settings, media_server):
    """The pass itself, called in this process: a message the first pass did not find (a worker
    between BRPOP and its unacked write, a restore between the unacked set and the list) and the
    next one does is left alone; one missing on two passes an interval apart is sent again, once."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from shared.jobs import JobStore
    from shared.queue import queue_keys
    import uuid

    from worker.recovery import UNACKED, recover_unqueued_jobs

    queue, tag = "audio-unqueued-pass", str(uuid.uuid4())
    mine = settings.model_copy(update={"redis_key_prefix": PREFIX + "-pass", "queue_name": queue,
                                       "job_recovery_interval_s": 0.3, "job_unqueued_after_s": 0.1})
    store = JobStore.from_settings(mine)

    def next_pass() -> list[str]:
        # the next pass that reads the queues: an interval after the last one (its lock)
        _wait(lambda: not store.redis.exists(store.key("unqueued", "scan")), 5, "the pass's lock stays")
        return recover_unqueued_jobs(store, mine)

    try:
        with TestClient(create_app(mine), raise_server_exceptions=False) as api:
            r = api.post("/jobs/embedding", data={"file_url": media_server.file("/unqueued/pass.wav", b"", status=404)})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        [raw] = store.redis.lrange(queue, 0, -1)
        _wait(lambda: store.clock() - store.get(job_id).created_ts > 0.2, 5, "the job is not old enough")
        assert next_pass() == []  # there
        store.redis.lrem(queue, 1, raw)
        # in a worker's hands: kombu's unacked hash, as its Redis transport writes it
        store.redis.hset(UNACKED, tag, json.dumps([json.loads(raw), "", queue]))
        assert next_pass() == [] and next_pass() == [] and not store.redis.exists(store.key("unqueued"))
        store.redis.hdel(UNACKED, tag)
        assert next_pass() == []  # missing once: noted
        store.redis.rpush(queue, raw)  # back (a restore)
        assert next_pass() == [] and not store.redis.exists(store.key("unqueued"))
        store.redis.lrem(queue, 1, raw)
        assert next_pass() == []  # missing: noted again, from scratch
        assert next_pass() == [job_id]  # missing an interval later: sent again
        assert next_pass() == [] and next_pass() == []  # there now, and sent once whatever follows
        assert _ids(store, queue) == [job_id]
        store.redis.delete(*queue_keys(queue))
        assert next_pass() == [] and next_pass() == []  # lost again: once per queued spell
        assert store.get(job_id).status == "queued"
    finally:
        store.redis.hdel(UNACKED, tag)
        drop_namespace(settings.redis_url, PREFIX + "-pass", *queue_keys(queue))
