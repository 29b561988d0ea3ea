"""A job whose upload is not in storage when its worker starts it, and why, said to its client and
its operator. It was "uploaded file is no longer in storage (expired)" (500) whatever the cause,
and the usual cause is not expiry: an API and workers that do not share one storage (two hosts
each with its own storage folder, a volume mounted in the API's container only) fail every job
so, minutes old, and the operator was sent looking at expiry settings. The session's real worker
runs each job; the record is written as the API writes it, without the upload behind it."""

from __future__ import annotations

import json
import time

from shared.jobs import JobRecord, JobStore, new_job_id
from shared.kinds import KINDS
from shared.queue import make_celery, send_job


def _run_without_upload(settings, waited_s: float = 0.0) -> JobRecord:
    store = JobStore.from_settings(settings)
    job_id = new_job_id()
    store.create(JobRecord(job_id=job_id, kind="embedding", queue=settings.queue_name,
                           files={"file": f"{job_id}/call.wav"}))
    if waited_s:  # created that long ago, by the job store's clock (the record's _created_ts)
        key = store.key("job", job_id)
        data = json.loads(store.redis.get(key))
        data["_created_ts"] -= waited_s
        store.redis.set(key, json.dumps(data), keepttl=True)
    store.confirm_queued([job_id])
    send_job(make_celery(settings), KINDS["embedding"], job_id, settings.queue_name)
    deadline = time.monotonic() + 60
    while (record := store.get(job_id)) is not None and not record.ended:
        assert time.monotonic() < deadline, record
        time.sleep(0.05)
    assert record is not None and record.status == "failed", record
    return record


def test_an_upload_the_workers_cannot_see_is_the_services_storage_not_expiry(worker, settings) -> None:
    record = _run_without_upload(settings)
    assert record.error.status_code == 500 and record.error.error_type == "ProcessingError", record.error
    assert "not in the workers' storage" in record.error.detail and "misconfigured" in record.error.detail
    assert "expired" not in record.error.detail
    # the operator is told what to look at, in the worker's log
    log = worker.log_path.read_text()
    assert f"job {record.job_id}: its upload" in log and "must share one storage" in log


def test_an_upload_removed_after_its_day_in_the_queue_is_a_503_to_submit_again(worker, settings) -> None:
    record = _run_without_upload(settings, settings.upload_expires_s + 3600)
    assert record.error.status_code == 503, record.error
    hours = (settings.upload_expires_s + 3600) / 3600
    assert f"waited {hours:.1f} h for a worker" in record.error.detail and "submit it again" in record.error.detail
