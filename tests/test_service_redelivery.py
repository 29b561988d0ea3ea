"""A worker process dying mid-job (OOM, GPU fault) loses no job: acks_late + reject_on_worker_lost.

Runs its own prefork worker on a separate queue so the session worker is not disturbed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime, timezone

from tests.conftest import gone, wait_for_job


def _ts(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def test_job_survives_its_worker_process_being_killed(worker, settings, short_sample, tmp_path):
    # 12 s of speech, whose first run holds at its first progress (tests/_held_engine_worker.py):
    # killed mid-run on a machine of any speed, and run again in full by the real engine
    import sys

    audio = short_sample
    from fastapi.testclient import TestClient

    from api.main import create_app
    from shared.jobs import JobStore
    from cli.launcher import Stack, wait_until

    queue = "audio-redelivery"
    local = settings.model_copy(update={"queue_name": queue})
    store = JobStore.from_settings(settings)

    def children() -> list[dict]:
        return [w for w in store.workers() if w["worker"].startswith("redeliver@") and w["diarization_model_loaded"]]

    stack = Stack(log_dir=tmp_path)
    try:
        proc = stack.spawn("redeliver", [
            sys.executable, "-m", "tests._held_engine_worker", "--pool", "prefork", "--concurrency", "1",
            "-Q", queue, "-n", "redeliver@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        ], env={"HELD_ENGINE_MARKER": str(tmp_path / "held")})
        wait_until(lambda: bool(children()), 180, "prefork worker", proc)
        [child] = children()
        with TestClient(create_app(local), raise_server_exceptions=False) as client:
            # a voiceprint too: kept apart from the record (shared/jobs.py keep_apart), the
            # redelivered job must find it again
            vector = json.dumps([1.0] + [0.0] * 191).encode()
            vp = client.post("/voiceprints/import", files={"file": ("v.json", vector, "application/json")},
                             data={"label": "Nobody", "model": "3d-speaker/campplus-cn-en-common"}).json()
            job = client.post("/jobs/diarize", files={"file": (audio.name, audio.read_bytes(), "audio/wav")},
                              data={"voiceprints": vp["id"]}).json()
            deadline = time.monotonic() + 60
            while client.get(f"/jobs/{job['job_id']}").json()["progress"] <= 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            first_start = client.get(f"/jobs/{job['job_id']}").json()["started_at"]
            killed_at = time.time()
            assert (tmp_path / "held").read_text() == str(child["pid"]), "the job is not mid-run in the pool process"
            os.kill(child["pid"], signal.SIGKILL)  # the pool process, as the OOM killer would

            done = wait_for_job(client, job["job_id"], timeout_s=180)
            assert done["status"] == "succeeded", done
            assert done["result"]["segments_count"] > 0
            assert done["result"]["identification"]["voiceprints"] == 1
            assert client.delete(f"/voiceprints/{vp['id']}").status_code == 204
            # run again from the start by the replacement process, not resumed or duplicated
            assert done["started_at"] != first_start and _ts(done["started_at"]) > killed_at
            assert done["attempts"] == 2
            # the dead process's lease was taken over at once, not waited out
            log = (tmp_path / "redeliver.log").read_text(errors="replace")
            assert "is gone, taking over" in log and "is running on" not in log
            assert proc.poll() is None, "the worker's main process must survive its child"
            assert gone(settings.storage_dir / job["job_id"])
    finally:
        stack.stop()


def test_a_message_for_a_task_the_worker_does_not_have_fails_its_job(worker, client, variant_app, settings, utterances,
                                                                      webhook_receiver):
    """An API newer than its workers (a rolling upgrade that reached the API first) queues a kind
    the worker has no task for. Celery drops such a message ("Received unregistered task"), and
    the job stayed "queued" for its record's day, its upload kept and its webhook never sent.
    Now the worker fails it at once (503, to submit again), deletes its upload and sends the
    webhook. Here the record comes from the real API (its own message parked on a queue nobody
    consumes) and the session worker gets the message an API of a later version would send."""
    import redis

    from shared.queue import make_celery

    parked = "audio-parked-unknown-task"
    hook = webhook_receiver.url("/unknown-task")
    app = variant_app(queue_name=parked)
    try:
        with open(utterances["spk1"][0], "rb") as fh:
            r = app.post("/jobs/embedding", files={"file": ("a.wav", fh.read(), "audio/wav")}, data={"webhook_url": hook})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert not gone(settings.storage_dir / job_id, 0.1), "the upload is stored"
        make_celery(settings).send_task("audio.transcribe", args=(job_id,), task_id=job_id, queue=settings.queue_name)

        done = wait_for_job(client, job_id, timeout_s=60)
        assert done["status"] == "failed", done
        assert done["error"]["status_code"] == 503 and "embedding jobs" in done["error"]["detail"], done
        assert done["attempts"] == 0, "never run"
        assert gone(settings.storage_dir / job_id), "its upload stays"
        deadline = time.monotonic() + 30
        while not webhook_receiver.for_path("/unknown-task") and time.monotonic() < deadline:
            time.sleep(0.1)
        (delivery,) = webhook_receiver.for_path("/unknown-task")
        assert json.loads(delivery["body"])["status"] == "failed", delivery
    finally:
        redis.Redis.from_url(settings.redis_url).delete(parked)
