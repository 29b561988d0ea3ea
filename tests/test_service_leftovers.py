"""Defects a previous audit left open, each tested against real parts (the session's Redis and
Celery worker, the API in-process, servers on 127.0.0.1). Each test fails on the code before
its fix:

* an exception nobody expected in the worker had its text shown to the client as the failed
  job's ``detail`` (``ValidationError: 1 validation error for DiarizeParams ...``: a library's
  internals, and for other exceptions the server's file paths);
"""

from __future__ import annotations

import io
import time

from tests.conftest import wait_for_job

ERROR_KEYS = {"detail", "error_type", "timestamp"}


# --- an unexpected worker exception: a reference for the client, the details in the log --------


def test_an_unexpected_worker_exception_is_not_shown_to_the_client(client, worker, settings, utterances):
    """A record whose parameters the worker's parameter model refuses stands for any exception
    nobody planned for (the API validated them at submit, so only a bug or a stale record gets
    here): pydantic's message names the model, the bad input and its docs URL."""
    from shared.jobs import JobRecord, JobStore
    from shared.kinds import KINDS
    from shared.queue import make_celery, send_job
    from shared.storage import get_storage

    store, storage = JobStore.from_settings(settings), get_storage(settings)
    job_id = "e" * 31 + "1"
    key = storage.save(job_id, "file", io.BytesIO(utterances["spk1"][0].read_bytes()), max_bytes=10**8)
    store.create(JobRecord(job_id=job_id, kind="diarize", filename="a.wav", files={"file": key},
                           params={"num_speakers": "many"}, queue=settings.queue_name))
    send_job(make_celery(settings), KINDS["diarize"], job_id, settings.queue_name)

    job = wait_for_job(client, job_id, timeout_s=60)
    assert job["status"] == "failed", job
    error = job["error"]
    assert error["error_type"] == "ProcessingError" and error["status_code"] == 500, error
    detail = error["detail"]
    for leak in ("DiarizeParams", "num_speakers", "many", "validation error", "pydantic", "ValidationError"):
        assert leak not in detail, detail
    assert job_id in detail, detail
    reference = detail.split("(error ", 1)[1].split(",", 1)[0]
    assert len(reference) == 12 and int(reference, 16) >= 0, detail
    # the result route says the same, in the documented shape
    r = client.get(f"/jobs/{job_id}/result")
    assert r.status_code == 409 and set(r.json()) == ERROR_KEYS, r.text

    # the worker's log has the reference next to the whole exception, for the operator
    deadline = time.monotonic() + 10
    while True:
        log = worker.log_path.read_text(errors="replace")
        at = log.find(f"(error {reference})")
        if at >= 0 and "DiarizeParams" in log[at:]:
            break
        assert time.monotonic() < deadline, log[-3000:]
        time.sleep(0.2)
