"""Round 8 of hostile conditions, the job life cycle: a worker that stalls past its lease and then
finishes, and workers whose clocks are not the API's.

Real processes: the session's Redis (DB of AUDIO_ANALYSIS_TEST_REDIS_URL), Celery workers of
their own queues (solo pool, as `up` runs them, started with tests/test_queued_records.py's
_start_worker), the API in process (TestClient). A stall is a real one (SIGSTOP, as a paused VM or
a host deep in swap); a clock set wrong is the worker's own ``time.time`` moved
(tests/_skewed_clock_worker.py).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import gone, wait_for_job
from tests.test_queued_records import _start_worker, _wait_for_status

STALL_QUEUE = "audio-round8-stall"
LEASE_S = 2.0


def _store(settings: Any):
    from shared.jobs import JobStore

    return JobStore.from_settings(settings)


def _api(settings: Any, queue: str) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(settings.model_copy(update={"queue_name": queue})),
                    raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def stalling(service_env, settings, tmp_path_factory) -> Iterator[Any]:
    """A worker of its own queue with 2 s leases (30 s by default), and an API sending to it."""
    env = {"AUDIO_ANALYSIS_QUEUE_NAME": STALL_QUEUE, "AUDIO_ANALYSIS_JOB_LEASE_S": str(LEASE_S)}
    for worker in _start_worker(tmp_path_factory.mktemp("stall"), "stall", STALL_QUEUE, env):
        for client in _api(settings, STALL_QUEUE):
            worker.client = client
            yield worker


def test_a_worker_that_stalled_past_its_lease_leaves_the_upload_to_the_jobs_next_attempt(
        stalling, settings, long_sample):
    """A worker stalls mid-job (SIGSTOP: a paused VM, a host deep in swap) past its lease; the
    recovery pass queues the job again and another worker starts it (attempt 2). The stalled
    worker then wakes and its engine returns: its outcome is rightly not written (the attempt
    moved on), but it deleted the upload as for any ended job, and the job's next run failed
    with "uploaded file is no longer in storage". The upload is now the running attempt's."""
    from shared.storage import get_storage
    from worker.recovery import recover_stalled_jobs

    store, storage = _store(settings), get_storage(settings)
    # an embedding reports no progress: nothing stops it before its end, as a compare or an
    # enrolment, or a diarization between its last report and its result
    job_id = stalling.client.post("/jobs/embedding", files={
        "file": (long_sample.name, long_sample.read_bytes(), "audio/wav")}).json()["job_id"]
    _wait_for_status(store, job_id, "running", timeout_s=60)
    stalling.proc.send_signal(signal.SIGSTOP)
    try:
        # its lease lapses (nobody refreshes it), and the recovery pass (here the test's own, the
        # stalled worker's being stopped too) queues the job again
        deadline = time.monotonic() + 10 * LEASE_S
        while store.redis.exists(store.key("job", job_id, "lease")):
            assert time.monotonic() < deadline, "the stalled worker's lease never lapsed"
            time.sleep(0.1)
        assert store.get(job_id).status == "running", "the job ended before its worker stalled"
        assert recover_stalled_jobs(store, storage, settings.model_copy(update={"queue_name": STALL_QUEUE})) \
            == [job_id]
        # another worker takes the message and starts attempt 2 (and, holding no lease, is as if
        # it died right then: the job's message runs attempt 3 once the stalled worker is free)
        assert store.mark_running(job_id).attempts == 2
    finally:
        stalling.proc.send_signal(signal.SIGCONT)
    done = wait_for_job(stalling.client, job_id, timeout_s=180)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 3 and done["result"]["embedding"], done
    assert gone(Path(settings.storage_dir) / job_id), "the upload outlived the job"
    assert f"job {job_id}: attempt 1 ended after the job moved on to attempt 2" in stalling.log.read_text(errors="replace")


# --- a worker whose clock is ahead of the API's ----------------------------------------------------

SKEW_QUEUE = "audio-round8-skew"
SKEW_HOOKS = "webhooks-round8-skew"
SKEW_S = 120.0  # ahead by twice the submission grace (60 s) and the webhooks' (60 s), the defaults


@pytest.fixture(scope="module")
def skewed(service_env, settings, tmp_path_factory) -> Iterator[Any]:
    """A worker 2 minutes ahead of everyone else, its recovery pass every second, consuming a
    queue of its own (deliveries it sends go to a queue nobody consumes), and an API sending to it."""
    env = {"AUDIO_ANALYSIS_QUEUE_NAME": SKEW_QUEUE, "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": SKEW_HOOKS,
           "AUDIO_ANALYSIS_JOB_RECOVERY_INTERVAL_S": "1", "SKEWED_CLOCK_S": str(SKEW_S)}
    store = _store(settings)
    try:
        for worker in _start_worker(tmp_path_factory.mktemp("skew"), "skew", SKEW_QUEUE, env,
                                    module="tests._skewed_clock_worker"):
            for client in _api(settings, SKEW_QUEUE):
                worker.client = client
                yield worker
    finally:
        store.redis.delete(SKEW_HOOKS)


def _passes(worker: Any, n: int = 2) -> None:
    """Until the worker's recovery pass (every second) has run ``n`` more times, give or take one."""
    time.sleep(n + 0.5)
    assert worker.proc.poll() is None


def test_a_worker_ahead_of_the_api_runs_the_job_it_took_before_its_confirmation(skewed, settings, utterances,
                                                                                 monkeypatch):
    """An idle worker takes a message the moment it is sent, before the API confirms the job. It
    measured how long the job had gone unconfirmed by its own clock against the API's creation
    time: 2 minutes ahead, it took every such job for a submission interrupted past the grace
    (60 s) and failed it at once, and the API, confirming a moment later, answered 503 "the
    submission was interrupted". Here the API sends the message and confirms 1 s later."""
    import api.dispatch

    send = api.dispatch.send_job

    def send_then_stall(*args: Any, **kwargs: Any) -> None:
        send(*args, **kwargs)
        time.sleep(1.0)  # the confirmation's milliseconds, drawn out: the idle worker has the message

    monkeypatch.setattr(api.dispatch, "send_job", send_then_stall)
    clip = utterances["spk1"][0]
    r = skewed.client.post("/jobs/embedding", files={"file": (clip.name, clip.read_bytes(), "audio/wav")})
    assert r.status_code == 202, r.text
    done = wait_for_job(skewed.client, r.json()["job_id"], timeout_s=60)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done


def test_a_worker_ahead_of_the_api_leaves_a_submission_being_confirmed_alone(skewed, settings):
    """The recovery pass of a worker 2 minutes ahead failed any job whose submission was still
    being confirmed (a batch's first records wait for its last file's message), as interrupted a
    minute ago. Here a record stays unconfirmed for two of the skewed worker's passes."""
    from shared.jobs import JobRecord, new_job_id

    store = _store(settings)
    record = store.create(JobRecord(job_id=new_job_id(), kind="embedding", queue=SKEW_QUEUE))
    _passes(skewed)
    assert store.get(record.job_id).status == "queued", store.get(record.job_id)
    assert store.confirm_queued([record.job_id]) == [], "the pass took the submission for interrupted"
    store.finish(record.job_id, "cancelled")


def test_a_worker_ahead_of_the_others_takes_no_delivery_in_progress_for_lost(skewed, settings):
    """Every delivery owed is due by a time its worker pushes on as it goes (now plus the
    webhooks' grace, 60 s). A worker 2 minutes ahead read every such time as past, took each
    delivery in progress over and sent it again, its receiver posted to twice when the first
    POST was still on its way. Here a delivery is due the grace from now, by an on-time worker."""
    from shared.jobs import new_job_id

    store = _store(settings)
    job_id = new_job_id()
    store.webhook_due(job_id, store.webhook_grace_s())
    due = store.webhook_due_at(job_id)
    try:
        _passes(skewed)
        assert store.webhook_due_at(job_id) == due, "the delivery was taken over"
        assert not store.redis.exists(store.key("webhook", job_id, "claim"))
        assert store.redis.llen(SKEW_HOOKS) == 0
    finally:
        store.webhook_settled(job_id)


def test_a_worker_behind_the_api_keeps_an_ended_jobs_record_as_long_as_results_are_kept(
        service_env, settings, tmp_path_factory):
    """A record's expiry is an absolute time (PXAT), which Redis reads by its own clock. A worker
    that set it by its own clock, minutes behind, had the results it wrote kept that much less,
    and once behind by more than results are kept (a day by default; 60 s here, with the worker
    2 minutes behind) the record expired as it was written: the client polling a job that had
    just ended got 404. Here the worker fails a job (its upload is gone; no models needed)."""
    from shared.jobs import JobRecord, new_job_id
    from shared.kinds import KINDS
    from shared.queue import make_celery, send_job

    queue = "audio-round8-behind"
    env = {"AUDIO_ANALYSIS_QUEUE_NAME": queue, "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false",
           "AUDIO_ANALYSIS_RESULT_EXPIRES_S": "60", "SKEWED_CLOCK_S": "-120"}
    store = _store(settings)
    for _ in _start_worker(tmp_path_factory.mktemp("behind"), "behind", queue, env,
                           module="tests._skewed_clock_worker"):
        job_id = new_job_id()
        store.create(JobRecord(job_id=job_id, kind="embedding", queue=queue, files={"file": f"{job_id}/gone.wav"}))
        store.confirm_queued([job_id])
        send_job(make_celery(settings), KINDS["embedding"], job_id, queue)
        deadline = time.monotonic() + 30
        while (record := store.get(job_id)) is not None and not record.ended:
            assert time.monotonic() < deadline, record
            time.sleep(0.05)
        assert record is not None, "the ended job's record expired as it was written"
        assert record.status == "failed" and "not in the workers' storage" in record.error.detail, record
        assert 50 <= store.redis.ttl(store.key("job", job_id)) <= 60
