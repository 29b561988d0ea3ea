"""Celery tasks: one per analysis kind, plus webhook delivery.

Every analysis task returns the job record as a plain JSON dict. A caller's mistake (bad audio,
bad embedding file) is an :class:`AnalysisError`: the job is marked failed with the documented
error body and the task itself succeeds, so Celery never retries it and the worker keeps going.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from typing import Any, Callable

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from shared import webhooks
from shared.errors import AnalysisError, ProcessingError
from shared.jobs import CANCELLED, FAILED, SUCCEEDED, TERMINAL, JobStore, error_body, public_view, utc_now
from shared.settings import get_settings
from shared.storage import Storage, get_storage
from worker.celery_app import app
from worker.lease import JobLease

log = logging.getLogger(__name__)
settings = get_settings()


class JobCancelled(Exception):
    """Raised from the progress callback when the client cancelled a running job."""


_store: JobStore | None = None


def store() -> JobStore:
    global _store
    if _store is None:
        _store = JobStore.from_settings(settings)
    return _store


def _progress_reporter(task: Task, job_id: str) -> Callable[[str, float], None]:
    last = {"t": 0.0, "step": None}

    def report(step: str, fraction: float) -> None:
        now = time.monotonic()
        # Redis writes at most ~4/s, but always on a step change and at the end
        if step == last["step"] and fraction < 1.0 and now - last["t"] < 0.25:
            return
        last.update(t=now, step=step)
        record = store().set_progress(job_id, fraction, step)
        if record is not None and record["status"] == CANCELLED:
            raise JobCancelled(job_id)
        task.update_state(state="PROGRESS", meta={"progress": round(fraction, 4), "step": step})

    return report


def _run(task: Task, job_id: str, work: Callable[[Callable[[str], Any], Callable[[str, float], None]], dict[str, Any]]) -> dict[str, Any]:
    """Shared life cycle: skip if already ended, mark running, run, record the outcome, clean up."""
    jobs, storage = store(), get_storage(settings)
    record = jobs.get(job_id)
    if record is None:
        # the record expired before a worker got to the job: nothing to report to
        storage.delete_job(job_id)
        return {"job_id": job_id, "status": FAILED, "error": error_body("ProcessingError", "job record expired")}
    if record["status"] in TERMINAL:
        # cancelled while queued, or a redelivery of a job that already finished
        log.info("job %s already %s: redelivered copy skipped", job_id, record["status"])
        storage.delete_job(job_id)
        _notify(record)
        return public_view(record)
    lease = JobLease(jobs.redis, jobs.key("job", job_id, "lease"), settings.job_lease_s)
    holder = lease.acquire()
    if holder is not None:
        # a second copy of a job that is still running elsewhere (the broker's visibility
        # timeout ran out, or a worker restored its unacked messages): look again later, when the
        # job has ended (skip) or its holder died (run it)
        log.info("job %s is running on %s: checking again in %.0f s", job_id, holder, settings.job_lease_s)
        raise task.retry(countdown=settings.job_lease_s)
    with lease:
        return _run_leased(task, job_id, record, work, jobs, storage)


def _run_leased(
    task: Task, job_id: str, record: dict[str, Any], work: Callable[..., dict[str, Any]], jobs: JobStore, storage: Storage
) -> dict[str, Any]:
    running = jobs.mark_running(job_id)
    if running is None or running["status"] in TERMINAL:
        # cancelled, or finished by the lease's previous holder, since the check above
        storage.delete_job(job_id)
        return public_view(running or record)
    task.update_state(state="PROGRESS", meta={"progress": 0.0, "step": "starting"})
    try:
        with ExitStack() as stack:
            def path_of(key: str) -> Any:
                if not storage.exists(key):
                    raise ProcessingError("uploaded file is no longer in storage (expired)")
                return stack.enter_context(storage.local_path(key))

            result = work(path_of, _progress_reporter(task, job_id))
        record, _ = jobs.finish(job_id, SUCCEEDED, result=result)
    except JobCancelled:
        record = jobs.get(job_id)
    except AnalysisError as exc:
        record, _ = jobs.finish(job_id, FAILED, error=error_body(exc.error_type, exc.detail, exc.status_code))
    except SoftTimeLimitExceeded:
        record, _ = jobs.finish(job_id, FAILED, error=error_body("ProcessingError", "job exceeded its time limit"))
    except Exception as exc:  # noqa: BLE001 - report, don't crash the worker or retry a poisoned job
        log.exception("job %s failed", job_id)
        record, _ = jobs.finish(job_id, FAILED, error=error_body("ProcessingError", f"{type(exc).__name__}: {exc}"))
    finally:
        # nothing of the audio is kept once the job ended, whatever the outcome
        storage.delete_job(job_id)
    record = record or jobs.get(job_id) or {"job_id": job_id, "status": FAILED}
    _notify(record)
    return public_view(record)


def _notify(record: dict[str, Any]) -> None:
    if record.get("webhook_url") and record.get("status") in TERMINAL:
        deliver_webhook.apply_async((record["job_id"],), queue=settings.webhook_queue_name)


def _engine():
    from shared.engine import get_engine

    return get_engine()


# max_retries=None: an analysis task retries only to wait for a copy of itself that is running
# elsewhere (see _run), for as long as that copy runs

@app.task(bind=True, max_retries=None, name="audio.diarize")
def diarize(self: Task, job_id: str, params: dict[str, Any]) -> dict[str, Any]:
    def work(path_of, progress):
        return _engine().diarize(
            path_of(params["file"]),
            num_speakers=params.get("num_speakers"),
            min_speakers=params.get("min_speakers"),
            max_speakers=params.get("max_speakers"),
            min_duration=params.get("min_duration"),
            progress=progress,
        ).model_dump()

    return _run(self, job_id, work)


@app.task(bind=True, max_retries=None, name="audio.embedding")
def embedding(self: Task, job_id: str, params: dict[str, Any]) -> dict[str, Any]:
    def work(path_of, progress):
        return _engine().embed(path_of(params["file"]), normalize=params.get("normalize", True)).model_dump()

    return _run(self, job_id, work)


@app.task(bind=True, max_retries=None, name="audio.compare")
def compare(self: Task, job_id: str, params: dict[str, Any]) -> dict[str, Any]:
    def work(path_of, progress):
        return _engine().compare(
            path_of(params["file1"]), path_of(params["file2"]), threshold=params.get("threshold")
        ).model_dump()

    return _run(self, job_id, work)


@app.task(bind=True, max_retries=None, name="audio.compare_embedding")
def compare_embedding(self: Task, job_id: str, params: dict[str, Any]) -> dict[str, Any]:
    def work(path_of, progress):
        # owned by the verification work; parses .npy / JSON / restricted pickle, never executes
        from shared.embedding_file import load_embedding

        with open(path_of(params["embedding"]), "rb") as fh:
            reference = load_embedding(fh.read(), params.get("embedding_filename"))
        return _engine().compare_embedding(
            path_of(params["audio"]), reference, threshold=params.get("threshold")
        ).model_dump()

    return _run(self, job_id, work)


TASKS = {"diarize": diarize, "embedding": embedding, "compare": compare, "compare_embedding": compare_embedding}


@app.task(
    bind=True,
    name="audio.deliver_webhook",
    autoretry_for=(webhooks.WebhookDeliveryError,),
    retry_backoff=settings.webhook_backoff_s,
    retry_backoff_max=settings.webhook_backoff_max_s,
    retry_jitter=False,
    max_retries=settings.webhook_max_retries,
)
def deliver_webhook(self: Task, job_id: str) -> dict[str, Any]:
    """POST the finished job to its webhook once, retrying with exponential backoff."""
    jobs = store()
    record = jobs.get(job_id)
    if record is None or not record.get("webhook_url"):
        return {"job_id": job_id, "delivered": False, "reason": "no job or no webhook"}
    delivered = jobs.key("webhook", job_id, "delivered")
    if jobs.redis.exists(delivered):
        return {"job_id": job_id, "delivered": False, "reason": "already delivered"}
    # one delivery task owns each job: a redelivered job enqueues a second delivery task, which
    # stops here, while the owner's own retries (same task id) pass
    claim = jobs.key("webhook", job_id, "claim")
    if not jobs.redis.set(claim, self.request.id, nx=True, ex=jobs.ttl) and jobs.redis.get(claim) != self.request.id:
        return {"job_id": job_id, "delivered": False, "reason": "another delivery owns this job"}

    attempt = self.request.retries + 1
    payload = {k: v for k, v in public_view(record).items() if k != "webhook"}
    try:
        code = webhooks.post(
            record["webhook_url"], job_id, payload, settings.webhook_secret.get_secret_value(), settings.webhook_timeout_s
        )
    except webhooks.WebhookDeliveryError as exc:
        final = self.request.retries >= self.max_retries
        jobs.set_webhook(job_id, status="failed" if final else "retrying", attempts=attempt, last_error=str(exc))
        if final:
            return {"job_id": job_id, "delivered": False, "reason": str(exc)}
        raise
    if jobs.redis.set(delivered, utc_now(), nx=True, ex=jobs.ttl):
        jobs.set_webhook(job_id, status="delivered", attempts=attempt, delivered_at=utc_now(), last_error=None)
    return {"job_id": job_id, "delivered": True, "status_code": code, "attempts": attempt}
