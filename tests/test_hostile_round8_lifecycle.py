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
