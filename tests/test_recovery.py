"""Issue 8, point 5: a job never stays "running" because whatever ran it died.

Real processes throughout: a private redis-server (AOF on, as `up` runs it), solo-pool Celery
workers (as `up` runs them), SIGKILL, SIGTERM (what `up` sends its worker on Ctrl-C) and a Redis
crash. Leases of 2 s and a recovery pass every second stand for the defaults (30 s / 10 s).
The workers run the real engine, but hold each job's first run at its first progress
(tests/_held_engine_worker.py), so a 12 s clip is still running when it is interrupted, and its
next run diarizes 12 s, not minutes.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import gone, wait_for_job
from tests.test_reliability import PrivateStack, post_clip


@pytest.fixture(scope="module")
def recovery(settings, tmp_path_factory):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from cli.launcher import Stack, free_port

    base = tmp_path_factory.mktemp("recovery")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    changes = {"redis_url": url, "storage_dir": base / "uploads", "queue_name": "audio-recovery", "job_lease_s": 2.0,
               "job_recovery_interval_s": 1.0}
    env = {
        "REDIS_URL": url, "AUDIO_ANALYSIS_REDIS_URL": url, "AUDIO_ANALYSIS_STORAGE_DIR": str(changes["storage_dir"]),
        "AUDIO_ANALYSIS_QUEUE_NAME": "audio-recovery", "AUDIO_ANALYSIS_JOB_LEASE_S": "2",
        "AUDIO_ANALYSIS_JOB_RECOVERY_INTERVAL_S": "1",
        # each job's first run holds at its first progress (tests/_held_engine_worker.py): still
        # running when it is interrupted on a machine of any speed; its next run is the real engine
        "HELD_ENGINE_MARKERS": str(base / "held"),
    }
    (base / "held").mkdir()
    p = PrivateStack(base, settings.model_copy(update=changes), env, port, Stack(log_dir=base),
                     worker_module="tests._held_engine_worker")
    try:
        p.start_redis()
        with TestClient(create_app(p.settings), raise_server_exceptions=False) as client:
            p.client = client
            yield p
    finally:
        p.stack.stop()


def _store(p: PrivateStack):
    from shared.jobs import JobStore

    return JobStore.from_settings(p.settings)


def _running_on(p: PrivateStack, job_id: str, timeout_s: float = 60) -> str:
    """The name of the worker whose process holds the job's lease, once the job reports progress."""
    store = _store(p)
    pids = {name: proc.pid for name, proc in p.workers.items() if proc.poll() is None}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = store.get(job_id)
        token = store.redis.get(store.key("job", job_id, "lease"))
        if record and record.status == "running" and record.progress > 0 and token:
            pid = int(token.split("|")[1])
            for name, worker_pid in pids.items():
                if worker_pid == pid:
                    return name
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not seen running: {store.get(job_id)}")


def _upload_exists(p: PrivateStack, job_id: str) -> bool:
    folder = Path(p.settings.storage_dir) / job_id
    return folder.is_dir() and any(folder.iterdir())


def _upload_gone(p: PrivateStack, job_id: str) -> bool:
    return gone(Path(p.settings.storage_dir) / job_id)


def test_redis_crash_mid_job_keeps_the_upload_and_the_job_finishes(recovery, short_sample):
    p = recovery
    p.start_workers("a", "b")
    job_id = post_clip(p.client, short_sample, "/jobs/diarize").json()["job_id"]
    _running_on(p, job_id)
    time.sleep(1.5)  # appendfsync everysec: the running record is on disk
    p.crash_redis()
    # down until the job has met the outage (its next progress report or its result could not be
    # written): a fixed few seconds let a fast job report before and after, never during it
    deadline = time.monotonic() + 120
    while not any(f"job {job_id} interrupted, job store unreachable" in p.log(n) for n in ("a", "b")):
        assert time.monotonic() < deadline, "no worker met the outage"
        time.sleep(0.2)
    # the worker noticed and kept the upload for the next try
    assert _upload_exists(p, job_id), "the upload was deleted while Redis was down"
    p.start_redis()
    restarted = time.monotonic()
    done = wait_for_job(p.client, job_id, timeout_s=180)
    print(f"\nRedis crash: job finished on attempt {done['attempts']} {time.monotonic() - restarted:.1f} s after Redis came back")
    assert done["status"] == "succeeded", done
    assert done["attempts"] >= 2
    assert _upload_gone(p, job_id)
    assert all(w.poll() is None for w in p.workers.values()), "a worker died with Redis"


def test_sigkilled_worker_job_finishes_on_another_attempt(recovery, short_sample):
    p = recovery
    job_id = post_clip(p.client, short_sample, "/jobs/diarize").json()["job_id"]
    victim = _running_on(p, job_id)
    killed_at = time.monotonic()
    p.workers[victim].send_signal(signal.SIGKILL)  # the whole solo worker, as the OOM killer would
    p.workers[victim].wait(10)

    requeued = None
    deadline = time.monotonic() + 120
    while True:
        record = p.client.get(f"/jobs/{job_id}").json()
        if requeued is None and (record["status"] == "queued" or record["attempts"] >= 2):
            requeued = time.monotonic() - killed_at
        if record["status"] in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, record
        time.sleep(0.05)
    finished = time.monotonic() - killed_at
    print(f"\nSIGKILLed worker: job back in the queue after {requeued:.1f} s, finished on attempt "
          f"{record['attempts']} {finished:.1f} s after the kill")
    assert record["status"] == "succeeded", record
    assert record["attempts"] == 2 and record["result"]["segments_count"] > 0
    assert requeued is not None and requeued < 15
    assert _upload_gone(p, job_id)
    del p.workers[victim]


def test_warm_shutdown_hands_the_running_job_back_at_once(recovery, short_sample):
    """SIGTERM is what `audio-analysis up` sends its worker on Ctrl-C (and docker on stop); that the
    handed-back job then runs to the end is shown through `up` itself in test_service_cli.py."""
    import json

    p = recovery
    [victim] = [n for n, w in p.workers.items() if w.poll() is None]
    job_id = post_clip(p.client, short_sample, "/jobs/diarize").json()["job_id"]
    assert _running_on(p, job_id) == victim
    stopped_at = time.monotonic()
    p.workers[victim].send_signal(signal.SIGTERM)
    p.workers[victim].wait(30)
    exited = time.monotonic() - stopped_at
    log = p.log(victim)
    assert f"job {job_id} handed back to the queue" in log, log[-3000:]
    record = p.client.get(f"/jobs/{job_id}").json()
    print(f"\nwarm shutdown: worker exited {exited:.1f} s after SIGTERM, job {record['status']}")
    assert exited < 15, "the worker waited for its job instead of handing it back"
    assert record["status"] == "queued" and record["attempts"] == 1 and record["progress"] == 0
    assert _upload_exists(p, job_id), "the handed-back job lost its upload"
    # back in the queue for the next worker: a message naming only this job
    store = _store(p)
    messages = [json.loads(m) for m in store.redis.lrange(p.settings.queue_name, 0, -1)]
    assert [m["headers"]["id"] for m in messages] == [job_id]
    del p.workers[victim]


def test_job_whose_worker_keeps_dying_fails_with_upload_deleted_and_webhook_sent(worker, settings, webhook_receiver):
    """After job_max_attempts lost workers: failed, upload gone, webhook delivered, like any failure."""
    import io

    from shared.jobs import JobRecord, JobStore
    from shared.storage import get_storage
    from tests.test_service_webhooks import _wait_for
    from worker.recovery import recover_stalled_jobs

    store, storage = JobStore.from_settings(settings), get_storage(settings)
    job_id = "f" * 32
    key = storage.save(job_id, "file", io.BytesIO(b"RIFF...."), max_bytes=100)
    store.create(JobRecord(job_id=job_id, kind="diarize", webhook_url=webhook_receiver.url("/gave-up"),
                           files={"file": key}))
    # its worker died on each attempt but this one, and this one's is gone too: nobody holds its lease
    store.mark_running(job_id)
    store.update(job_id, lambda r: r.model_copy(update={"lost": settings.job_max_attempts - 1}))
    recover_stalled_jobs(store, storage, settings)  # the session worker's own pass may get there first
    record = store.get(job_id)
    assert record.status == "failed" and "lost 3 times" in record.error.detail, record
    assert gone(Path(settings.storage_dir) / job_id)
    assert job_id not in store.running_ids()
    [hit] = _wait_for(lambda: webhook_receiver.for_path("/gave-up"), 30)
    assert b'"status":"failed"' in hit["body"]


def test_a_worker_dying_as_it_hands_a_job_back_loses_no_job(recovery, short_sample):
    """A warm shutdown set the record back to queued and then sent the new message: a worker that
    died between the two (simulated in tests/_handback_crash_worker.py: it exits where it would
    send) left a queued record that no message named, which recovery (it looks at running jobs)
    never saw. The message now goes first, so the record stays running under a lease that lapses."""
    import sys

    p = recovery
    for name in list(p.workers):
        if p.workers[name].poll() is None:
            p.workers[name].send_signal(signal.SIGTERM)
            p.workers[name].wait(30)
        del p.workers[name]
    victim = p.stack.spawn("handback-crash", [
        sys.executable, "-m", "tests._handback_crash_worker", "--pool", "solo", "-Q", p.settings.queue_name,
        "-n", "handback-crash@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ], env=p.env)
    p.workers["handback-crash"] = victim
    job_id = post_clip(p.client, short_sample, "/jobs/diarize").json()["job_id"]
    assert _running_on(p, job_id, timeout_s=180) == "handback-crash"
    victim.send_signal(signal.SIGTERM)
    victim.wait(30)
    assert victim.returncode == 1, "the simulated death did not happen"
    # the next worker to come up finds the job: its recovery pass looks at running jobs
    p.worker("rescuer")
    done = wait_for_job(p.client, job_id, timeout_s=240)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2 and done["result"]["segments_count"] > 0
    del p.workers["handback-crash"]
