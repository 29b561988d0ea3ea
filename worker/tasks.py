"""Celery tasks: one per analysis kind, plus webhook delivery.

A task's message carries only the job id; what to run (parameters, upload keys) is read from the
job record, so the broker, the result backend and Flower never hold file names, webhook URLs or
results. The task's own Celery state follows the job's: SUCCESS for a succeeded job, FAILURE
(:class:`JobFailed`, with only the error type) for a failed one, REVOKED for a cancelled one.

A caller's mistake (bad audio, bad embedding file) is an :class:`AnalysisError`: the job is
marked failed with the documented error body and never retried; the worker keeps going.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from typing import Any, Callable

import redis
from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from shared import webhooks
from shared.audio_limits import check_audio_limits
from shared.errors import AnalysisError, ProcessingError
from shared.jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, TERMINAL, JobStore, error_body, public_view, utc_now
from shared.settings import get_settings
from shared.storage import Storage, get_storage
from worker import lifecycle
from worker.celery_app import app
from worker.lease import JobLease

log = logging.getLogger(__name__)
settings = get_settings()

TASK_NAMES = {
    "diarize": "audio.diarize",
    "embedding": "audio.embedding",
    "compare": "audio.compare",
    "compare_embedding": "audio.compare_embedding",
}


class JobCancelled(Exception):
    """Raised from the progress callback when the client cancelled a running job."""


class HandBack(Exception):
    """Raised from the progress callback when the worker is shutting down: requeue the job now."""


class LeaseLost(Exception):
    """This attempt's lease expired and the job may run elsewhere: stop without recording anything."""


class JobFailed(Exception):
    """The Celery-side outcome of a failed job: carries the error type only (Flower shows it)."""


class JobInterrupted(Exception):
    """The job store became unreachable mid-job: the upload is kept and the job runs again later."""


_store: JobStore | None = None


def store() -> JobStore:
    global _store
    if _store is None:
        _store = JobStore.from_settings(settings)
    return _store


def _progress_reporter(task: Task, job_id: str, attempt: int, lease: JobLease) -> Callable[[str, float], None]:
    last = {"t": 0.0, "step": None}

    def report(step: str, fraction: float) -> None:
        # checked on every call: a warm shutdown hands the job back at once
        if lifecycle.shutting_down(task.request.hostname):
            raise HandBack(job_id)
        if lease.lost:
            raise LeaseLost(job_id)
        now = time.monotonic()
        # Redis writes at most ~4/s, but always on a step change and at the end
        if step == last["step"] and fraction < 1.0 and now - last["t"] < 0.25:
            return
        last.update(t=now, step=step)
        record = store().set_progress(job_id, fraction, step)
        if record is not None and record["status"] == CANCELLED:
            raise JobCancelled(job_id)
        if record is not None and record.get("attempts") != attempt:
            raise LeaseLost(job_id)
        task.update_state(state="PROGRESS", meta={"progress": round(fraction, 4), "step": step})

    return report


def _settle(task: Task, record: dict[str, Any] | None, job_id: str) -> dict[str, Any]:
    """End the Celery task in the state matching the job's, with nothing but the job id in it."""
    status = (record or {}).get("status", FAILED)
    if status == SUCCEEDED or status not in TERMINAL:
        return {"job_id": job_id, "status": status}
    if status == CANCELLED:
        task.backend.mark_as_revoked(job_id, "cancelled", request=task.request)
        task.send_event("task-revoked", terminated=False, signum=None, expired=False)
        raise Ignore()
    error_type = ((record or {}).get("error") or {}).get("error_type", "ProcessingError")
    raise JobFailed(error_type)


def _run(task: Task, job_id: str, work: Callable[..., dict[str, Any]], legacy_params: dict[str, Any] | None) -> dict[str, Any]:
    """Shared life cycle: skip if already ended, mark running, run, record the outcome, clean up."""
    jobs, storage = store(), get_storage(settings)
    record = jobs.get(job_id)
    if record is None:
        # the record expired before a worker got to the job: nothing to report to
        storage.delete_job(job_id)
        return {"job_id": job_id, "status": "expired"}
    if record["status"] in TERMINAL:
        # cancelled while queued, or a redelivery of a job that already finished
        log.info("job %s already %s: redelivered copy skipped", job_id, record["status"])
        storage.delete_job(job_id)
        _notify(record)
        return _settle(task, record, job_id)
    lease = JobLease(jobs.redis, jobs.key("job", job_id, "lease"), settings.job_lease_s)
    holder = lease.acquire()
    if holder is not None:
        # a second copy of a job that is still running elsewhere (the broker's visibility
        # timeout ran out, or a worker restored its unacked messages): look again later, when the
        # job has ended (skip) or its holder died (run it)
        log.info("job %s is running on %s: checking again in %.0f s", job_id, holder, settings.job_lease_s)
        raise task.retry(countdown=settings.job_lease_s)
    with lease:
        return _run_leased(task, job_id, work, jobs, storage, lease, legacy_params)


def give_up(jobs: JobStore, storage: Storage, job_id: str, attempt: int | None, detail: str) -> dict[str, Any] | None:
    """Fail a job whose workers kept dying: delete its upload, send its webhook."""
    record, changed = jobs.finish(job_id, FAILED, error=error_body("ProcessingError", detail), attempt=attempt)
    if changed:
        storage.delete_job(job_id)
        _notify(record)
    return record


def _run_leased(
    task: Task, job_id: str, work: Callable[..., dict[str, Any]], jobs: JobStore, storage: Storage, lease: JobLease,
    legacy_params: dict[str, Any] | None,
) -> dict[str, Any]:
    running = jobs.mark_running(job_id)
    if running is None or running["status"] in TERMINAL:
        # cancelled, or finished by the lease's previous holder, since the check above
        storage.delete_job(job_id)
        return _settle(task, running, job_id)
    attempt = running["attempts"]
    if running.get("_lost", 0) >= settings.job_max_attempts:
        # a job whose worker died job_max_attempts times (a file that gets it OOM-killed, say)
        detail = f"the job's worker was lost {running['_lost']} times; giving up"
        log.error("job %s: %s", job_id, detail)
        return _settle(task, give_up(jobs, storage, job_id, attempt, detail), job_id)
    params = running.get("_params") or legacy_params or {}
    duration_limit = min(settings.max_audio_seconds, settings.sync_max_audio_seconds) if running.get("sync") \
        else settings.max_audio_seconds
    task.update_state(state="PROGRESS", meta={"progress": 0.0, "step": "starting"})
    outcome: tuple[str, dict[str, Any] | None, dict[str, Any] | None] | None = None
    try:
        with ExitStack() as stack:
            def path_of(key: str, audio: bool = True) -> Any:
                if not storage.exists(key):
                    raise ProcessingError("uploaded file is no longer in storage (expired)")
                path = stack.enter_context(storage.local_path(key))
                if audio:
                    # the API checked the header already; checked again here for jobs queued
                    # before, and because the worker is what an hour-long file would tie up
                    check_audio_limits(path, max_duration=duration_limit, min_sample_rate=settings.min_sample_rate)
                return path

            result = work(path_of, _progress_reporter(task, job_id, attempt, lease), params)
        outcome = (SUCCEEDED, result, None)
    except JobCancelled:
        pass  # recorded by whoever cancelled it
    except HandBack:
        # warm shutdown (Ctrl-C of `up`, a deploy): the job goes back to the queue now, its
        # upload stays, and another (or the restarted) worker runs it from the start
        if jobs.requeue(job_id, attempt, lost=False) is not None:
            _enqueue(job_id, running["kind"], running.get("_queue"))
            log.warning("job %s handed back to the queue: worker shutting down", job_id)
        return {"job_id": job_id, "status": QUEUED}
    except LeaseLost:
        log.error("job %s: lease lost mid-run; leaving the job to its new attempt", job_id)
        return {"job_id": job_id, "status": "superseded"}
    except AnalysisError as exc:
        outcome = (FAILED, None, error_body(exc.error_type, exc.detail, exc.status_code))
    except SoftTimeLimitExceeded:
        outcome = (FAILED, None, error_body("ProcessingError", "job exceeded its time limit"))
    except redis.RedisError as exc:
        return _interrupted(job_id, exc)
    except Exception as exc:  # noqa: BLE001 - report, don't crash the worker or retry a poisoned job
        log.exception("job %s failed", job_id)
        outcome = (FAILED, None, error_body("ProcessingError", f"{type(exc).__name__}: {exc}"))
    try:
        if outcome is not None:
            status, result, error = outcome
            record, _ = jobs.finish(job_id, status, result=result, error=error, attempt=attempt)
        else:
            record = jobs.get(job_id)
    except redis.RedisError as exc:
        return _interrupted(job_id, exc)
    # nothing of the audio is kept once the job ended, whatever the outcome
    storage.delete_job(job_id)
    record = record or {"job_id": job_id, "status": FAILED}
    _notify(record)
    return _settle(task, record, job_id)


def _interrupted(job_id: str, exc: Exception) -> dict[str, Any]:
    # Redis went away mid-job. The upload stays: once Redis is back, the lease lapses and the
    # recovery pass runs the job again (worker/recovery.py); deleting it here lost the job.
    log.error("job %s interrupted, job store unreachable (%s); it will run again", job_id, exc)
    raise JobInterrupted("job store unreachable") from None


def _enqueue(job_id: str, kind: str, queue: str | None = None) -> None:
    app.send_task(TASK_NAMES[kind], args=(job_id,), task_id=job_id, queue=queue or settings.queue_name)


def _notify(record: dict[str, Any]) -> None:
    if record.get("webhook_url") and record.get("status") in TERMINAL:
        deliver_webhook.apply_async((record["job_id"],), queue=settings.webhook_queue_name)


def _engine():
    from engine.core import get_engine

    return get_engine()


# max_retries=None: an analysis task retries only to wait for a copy of itself that is running
# elsewhere (see _run), for as long as that copy runs

# throws: an expected outcome, logged without a traceback
_ANALYSIS = {"bind": True, "max_retries": None, "throws": (JobFailed, JobInterrupted)}


# params: only in messages queued before the job record held them
@app.task(name="audio.diarize", **_ANALYSIS)
def diarize(self: Task, job_id: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    def work(path_of, progress, params):
        return _engine().diarize(
            path_of(params["file"]),
            num_speakers=params.get("num_speakers"),
            min_speakers=params.get("min_speakers"),
            max_speakers=params.get("max_speakers"),
            min_duration=params.get("min_duration"),
            progress=progress,
        ).model_dump()

    return _run(self, job_id, work, params)


@app.task(name="audio.embedding", **_ANALYSIS)
def embedding(self: Task, job_id: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    def work(path_of, progress, params):
        return _engine().embed(path_of(params["file"]), normalize=params.get("normalize", True)).model_dump()

    return _run(self, job_id, work, params)


@app.task(name="audio.compare", **_ANALYSIS)
def compare(self: Task, job_id: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    def work(path_of, progress, params):
        return _engine().compare(
            path_of(params["file1"]), path_of(params["file2"]), threshold=params.get("threshold")
        ).model_dump()

    return _run(self, job_id, work, params)


@app.task(name="audio.compare_embedding", **_ANALYSIS)
def compare_embedding(self: Task, job_id: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    def work(path_of, progress, params):
        # owned by the verification work; parses .npy / JSON / restricted pickle, never executes
        from shared.embedding_file import load_embedding

        with open(path_of(params["embedding"], audio=False), "rb") as fh:
            reference = load_embedding(fh.read(), params.get("embedding_filename"))
        return _engine().compare_embedding(
            path_of(params["audio"]), reference, threshold=params.get("threshold")
        ).model_dump()

    return _run(self, job_id, work, params)


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
            record["webhook_url"], job_id, payload, settings.webhook_secret.get_secret_value(), settings.webhook_timeout_s,
            allow_private=settings.webhook_allow_private_addresses,
        )
    except webhooks.WebhookDeliveryError as exc:
        final = self.request.retries >= self.max_retries
        jobs.set_webhook(job_id, status="failed" if final else "retrying", attempts=attempt, last_error=str(exc))
        if final:
            return {"job_id": job_id, "delivered": False}
        raise
    if jobs.redis.set(delivered, utc_now(), nx=True, ex=jobs.ttl):
        jobs.set_webhook(job_id, status="delivered", attempts=attempt, delivered_at=utc_now(), last_error=None)
    return {"job_id": job_id, "delivered": True, "status_code": code, "attempts": attempt}
