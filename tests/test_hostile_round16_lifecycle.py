"""Round 16 of the hostile look at the job life cycle: real Redis, real Celery worker processes
(the production ``celery -A worker.celery_app worker`` command line), the API in process.

* a prefork worker's main process frozen (SIGSTOP: a paused VM, a host deep in swap) while its
  BRPOP waits in Redis: the next message pushed to its queue is handed to the frozen process's
  socket, in no list and in no worker's unacked set. Only ``recover_unqueued_jobs`` could send it
  again, and it looked at a job only once queued ``job_unqueued_after_s`` (300 s) plus two passes:
  six minutes of a lost job, while the frozen worker's own pool process knew within seconds
  (``main_stall_s``) that its main process had stopped. That pool process now says so in Redis,
  and every worker's pass then looks at every confirmed queued job, whatever its age, until the
  usual look covers what the stall could have taken.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

from tests.conftest import drop_namespace, wait_for_job

PREFIX = "aa-r16-frozen"
QUEUE, OTHER, HOOKS = "audio-r16-frozen", "audio-r16-other", "webhooks-r16-frozen"
WORKER_ENV = {
    "AUDIO_ANALYSIS_REDIS_KEY_PREFIX": PREFIX, "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": HOOKS,
    "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false", "AUDIO_ANALYSIS_JOB_LEASE_S": "2",
    "AUDIO_ANALYSIS_JOB_RECOVERY_INTERVAL_S": "1",
}


def _wait(predicate, timeout_s: float, what: Any, step: float = 0.1) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, what() if callable(what) else what
        time.sleep(step)
    return time.monotonic() - started


def _ids(store: Any, queue: str) -> list[str]:
    from shared.queue import queue_keys

    return sorted(json.loads(raw)["headers"]["id"]
                  for key in queue_keys(queue) for raw in store.redis.lrange(key, 0, -1))


def _unacked(store: Any) -> str:
    from worker.recovery import UNACKED

    return "\n".join(v.decode(errors="replace") if isinstance(v, bytes) else v
                     for v in store.redis.hvals(UNACKED))


def test_a_message_a_frozen_main_process_took_is_sent_again_within_a_minute(
        service_env, settings, media_server, tmp_path_factory):
    """Worker A (prefork, no models) alone consumes QUEUE; worker B consumes another queue and
    runs the recovery passes (every second; ``job_unqueued_after_s`` stays 300 s). A's main
    process is stopped and a job submitted at once: its message leaves the list for A's frozen
    socket (tried again should A's BRPOP have been between two waits). The message is back in the
    queue within 60 s (measured about 17 s: the 15 s stall bound and two passes); before, it stayed
    nowhere past the 60 s (the six minutes above). After SIGCONT, A runs the job once: its URL,
    which answers 404, is asked once, and the job failed at attempt 1."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from cli.launcher import Stack
    from shared.jobs import JobStore
    from shared.queue import queue_keys

    mine = settings.model_copy(update={"redis_key_prefix": PREFIX, "queue_name": QUEUE, "webhook_queue_name": HOOKS})
    store = JobStore.from_settings(mine)
    stack = Stack(log_dir=tmp_path_factory.mktemp("r16-frozen"))
    frozen = None
    try:
        a = stack.start_worker(queues=[QUEUE], name="r16frozen", pool="prefork",
                               env={**WORKER_ENV, "AUDIO_ANALYSIS_QUEUE_NAME": QUEUE})
        stack.start_worker(queues=[OTHER], name="r16other", env={**WORKER_ENV, "AUDIO_ANALYSIS_QUEUE_NAME": OTHER})

        def listed(name: str) -> bool:
            return any(w["worker"].startswith(f"{name}@") for w in store.workers())

        _wait(lambda: listed("r16frozen") and listed("r16other"), 90,
              lambda: (stack.log_dir / "r16frozen.log").read_text(errors="replace")[-3000:])
        time.sleep(1.5)  # A's consumer is in its BRPOP loop
        with TestClient(create_app(mine), raise_server_exceptions=False) as api:
            job_id = path = ""
            for attempt in range(3):
                path = f"/r16/frozen-{attempt}.wav"
                url = media_server.file(path, b"gone", status=404)
                a.send_signal(signal.SIGSTOP)
                frozen = a
                time.sleep(0.05)
                r = api.post("/jobs/embedding", data={"file_url": url})
                assert r.status_code == 202, r.text
                job_id = r.json()["job_id"]
                time.sleep(0.3)
                if job_id not in _ids(store, QUEUE) and job_id not in _unacked(store):
                    break  # taken by the frozen process's BRPOP: nowhere in Redis
                # A was between two BRPOPs: the message waits in the list; let A run it, try again
                a.send_signal(signal.SIGCONT)
                frozen = None
                wait_for_job(api, job_id, timeout_s=60)
                time.sleep(1.5)
            else:
                raise AssertionError("the frozen worker's BRPOP never took a message")
            took = _wait(lambda: job_id in _ids(store, QUEUE), 60,
                         lambda: f"the message the frozen worker took is still nowhere; {store.get(job_id)}")
            print(f"\nthe message a frozen main process took was sent again {took:.1f} s after the submission")
            assert store.get(job_id).status == "queued"
            a.send_signal(signal.SIGCONT)
            frozen = None
            record = wait_for_job(api, job_id, timeout_s=60)
            assert record["status"] == "failed" and record["attempts"] == 1, record
            assert "404" in record["error"]["detail"], record["error"]
            # the copy that was sent again and the frozen one: the job ran once
            _wait(lambda: job_id not in _ids(store, QUEUE) and job_id not in _unacked(store), 30,
                  "a copy of the job's message stays in the broker")
            assert len(media_server.for_path(path)) == 1, media_server.for_path(path)
    finally:
        if frozen is not None:
            frozen.send_signal(signal.SIGCONT)
        stack.stop()
        drop_namespace(settings.redis_url, PREFIX, *queue_keys(QUEUE), *queue_keys(OTHER), *queue_keys(HOOKS))
