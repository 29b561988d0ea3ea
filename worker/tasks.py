"""Celery tasks: one per job kind of shared/kinds.py (``audio.<kind>``), plus webhook delivery.

A task's message carries only the job id; what to run (parameters, upload keys) is read from the
job record, so the broker, the result backend and Flower never hold file names, webhook URLs or
results. The task's own Celery state follows the job's: SUCCESS for a succeeded job, FAILURE
(:class:`JobFailed`, with only the error type) for a failed one, REVOKED for a cancelled one.

A caller's mistake (bad audio, bad embedding file, a URL that cannot be fetched) is an
:class:`AnalysisError`: the job is marked failed with the documented error body and never
retried; the worker keeps going. Audio given by URL is fetched here, at the start of the job
(``shared/url_input.py``), not by the API.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import redis
from celery import Task, signals
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

from shared import logs, webhooks
from shared.audio_limits import SYNC_HINT, DurationBudget, check_audio_limits
from shared.errors import AnalysisError, AudioTooLongError, ModelError, ProcessingError
from shared.jobs import CANCELLED, FAILED, QUEUED, SUCCEEDED, JobRecord, JobStore, is_job_id, utc_now
from shared.kinds import KINDS, FileField, JobKind, Params
from shared.probe_sandbox import SandboxUnavailable
from shared.queue import WEBHOOK_TASK, send_job
from shared.settings import get_settings
from shared.storage import Storage, get_storage, out_of_room, refused_by_storage
from shared.url_input import DOWNLOAD_STEP, fetch_audio
from worker import lifecycle, telemetry, webhook_share
from worker.celery_app import app
from worker.deadline import JobDeadline, JobTimedOut
from worker.lease import JobLease
from worker.recovery import fail_interrupted

log = logging.getLogger(__name__)
settings = get_settings()


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
        if step != last["step"]:
            logs.bind(step=step)
            log.info("step %s", step)
        last.update(t=now, step=step)
        record = store().set_progress(job_id, fraction, step)
        if record is not None and record.status == CANCELLED:
            raise JobCancelled(job_id)
        if record is not None and record.attempts != attempt:
            raise LeaseLost(job_id)
        task.update_state(state="PROGRESS", meta={"progress": round(fraction, 4), "step": step})

    return report


def _settle(task: Task, record: JobRecord | None, job_id: str) -> dict[str, Any]:
    """End the Celery task in the state matching the job's, with nothing but the job id in it."""
    if record is None:
        raise JobFailed("ProcessingError")
    if record.status == SUCCEEDED or not record.ended:
        return {"job_id": job_id, "status": record.status}
    if record.status == CANCELLED:
        task.backend.mark_as_revoked(job_id, "cancelled", request=task.request)
        task.send_event("task-revoked", terminated=False, signum=None, expired=False)
        raise Ignore()
    raise JobFailed(record.error.error_type if record.error else "ProcessingError")


# how long a task waits before it hands back a message it could not start (the job store did not
# answer): a Redis that stays away is not asked again many times a second
NOT_STARTED_PAUSE_S = 1.0


def _not_started(task: Task, job_id: str, exc: Exception) -> Reject:
    """The job store failed before this job was marked running: give the message back.

    With ``acks_late`` a task that raises is acked all the same (it counts as done), and a job
    still "queued" in its record has no lease and is in no running set for the recovery pass to
    find: a Redis blip at this moment lost the job for good (its record said queued until it
    expired). Rejected with requeue, the message goes back to the head of its queue, or, with
    Redis still away, stays unacked until the broker restores it."""
    log.warning("%s %s: job store unreachable before it started (%s); message handed back",
                task.name, job_id, exc)
    time.sleep(NOT_STARTED_PAUSE_S)
    return Reject(f"job store unreachable: {type(exc).__name__}", requeue=True)


# How long a task waits, at most, for the API to confirm a job's submission before it looks again
# later (a retry): the API confirms milliseconds after it sent the message.
UNCONFIRMED_WAIT_S = 0.5


def _confirmation_awaited(task: Task, jobs: JobStore, storage: Storage, record: JobRecord) -> bool:
    """Whether this never-started job's submission was unconfirmed (``JobStore.confirm_queued``):
    it was waited for until confirmed, or failed here as the recovery pass fails it once
    ``job_submit_grace_s`` passed; the caller reads the record again. Raises a retry while it
    may still be confirmed.

    An idle worker takes a message the moment it is sent, before the API confirms it: one whose
    API died right then (its client got no 202 and submits the job again) was run at once, and
    the job ran twice. A record of an earlier version was never unconfirmed: False at once."""
    # how long by the Redis clock (JobStore.clock): by this process's own clock against the API's
    # creation time, a worker ahead by the grace failed every job it took before its confirmation
    waited_s = jobs.unconfirmed_for_s(record.job_id)
    if waited_s is None:
        return False
    deadline = time.monotonic() + UNCONFIRMED_WAIT_S
    while waited_s is not None:
        if waited_s >= settings.job_submit_grace_s:
            fail_interrupted(jobs, storage, record.job_id, settings)
            return True
        if time.monotonic() >= deadline:
            log.info("job %s: its submission is not confirmed yet; checking again later", record.job_id)
            countdown = min(5.0, settings.job_submit_grace_s - waited_s)
            # held by this worker from now on (an ETA message, unacked): due again by then, or the
            # recovery pass sends the job's message again (JobStore.hold_message), should this
            # worker die holding it: the broker would hand it out again only after its visibility
            # timeout, 6 h, while the job, confirmed meanwhile, stayed "queued"
            jobs.hold_message(record.job_id, countdown + settings.job_lease_s)
            raise task.retry(countdown=countdown)
        time.sleep(0.02)
        waited_s = jobs.unconfirmed_for_s(record.job_id)
    return True


def _run(task: Task, job_id: str, kind: JobKind, legacy_params: dict[str, Any] | None) -> dict[str, Any]:
    """Shared life cycle: skip if already ended, mark running, run, record the outcome, clean up."""
    jobs, storage = store(), get_storage(settings)
    try:
        record = jobs.get(job_id)
        if record is not None and record.status == QUEUED and not record.attempts \
                and _confirmation_awaited(task, jobs, storage, record):
            record = jobs.get(job_id)
        if task.request.retries:
            # a retry of this message: one held for a confirmation (hold_message) is heard from
            jobs.drop_hold(job_id)
    except redis.RedisError as exc:
        raise _not_started(task, job_id, exc) from None
    if record is None:
        # the record expired before a worker got to the job: nothing to report to
        storage.delete_job(job_id)
        return {"job_id": job_id, "status": "expired"}
    if record.ended:
        # cancelled while queued, or a redelivery of a job that already finished
        log.info("job %s already %s: redelivered copy skipped", job_id, record.status)
        storage.delete_job(job_id)
        _notify(record)
        return _settle(task, record, job_id)
    lease = JobLease(jobs.redis, jobs.key("job", job_id, "lease"), settings.job_lease_s)
    try:
        holder = lease.acquire()
    except redis.RedisError as exc:
        raise _not_started(task, job_id, exc) from None
    if holder is not None:
        # a second copy of a job that is still running elsewhere (the broker's visibility
        # timeout ran out, or a worker restored its unacked messages): look again later, when the
        # job has ended (skip) or its holder died (run it)
        log.info("job %s is running on %s: checking again in %.0f s", job_id, holder, settings.job_lease_s)
        raise task.retry(countdown=settings.job_lease_s)
    with lease, logs.bound(request_id=record.request_id):
        return _run_leased(task, job_id, kind, jobs, storage, lease, legacy_params)


def _cancelled(jobs: JobStore, job_id: str) -> bool:
    """Whether the job's record says it was cancelled (a job store out of reach: not known, no)."""
    try:
        record = jobs.get(job_id)
    except redis.RedisError:
        return False
    return record is not None and record.status == CANCELLED


def _missing_upload(record: JobRecord, key: str, jobs: JobStore) -> ProcessingError:
    """Why a job's upload is not in storage, for its client and its operator. It said "no longer
    in storage (expired)" whatever the cause, and the usual one is not expiry: an API and workers
    that do not share one storage (two hosts each with its own AUDIO_ANALYSIS_STORAGE_DIR, a
    volume mounted in the API's container only) fail every job that way, minutes old."""
    # by the job store's clock (created_ts, set by JobStore.create from Redis's TIME in every
    # release), as expiry is counted elsewhere
    waited: float | None = None
    try:
        if record.created_ts:
            waited = jobs.clock() - record.created_ts
    except redis.RedisError:
        pass
    kept = settings.upload_expires_s
    # the upload was written before its record (a large one minutes before), and the sweep goes
    # by the upload's age: an hour's margin, so a swept upload is never told as misconfiguration
    if waited is not None and waited >= kept - 3600:
        # the service's backlog, not the caller's input: the same job submitted again runs
        return ProcessingError(
            f"the job waited {waited / 3600:.1f} h for a worker, past the {kept / 3600:g} h an upload is kept, "
            "and its upload was removed; submit it again", status_code=503)
    log.error("job %s: its upload %s is not in this worker's storage (%s), %s after the job was created: the "
              "API and the workers must share one storage (AUDIO_ANALYSIS_STORAGE_BACKEND, and the same "
              "AUDIO_ANALYSIS_STORAGE_DIR volume or S3 bucket)", record.job_id, key, settings.storage_backend,
              "unknown time" if waited is None else f"{waited:.0f} s")
    return ProcessingError("the job's upload is not in the workers' storage (the service's storage is "
                           "misconfigured: its operator is told in the worker's log); the job was not run")


def give_up(jobs: JobStore, storage: Storage, job_id: str, attempt: int | None, error: AnalysisError) -> JobRecord | None:
    """Fail a job for good with ``error`` (its workers kept dying, it was stuck, no worker has its
    task): delete its upload, send its webhook; only while it is at ``attempt``."""
    record, changed = jobs.finish(job_id, FAILED, error=error.body(), attempt=attempt, notify=True)
    if changed:
        storage.delete_job(job_id)
        _notify(record)
    return record


@signals.task_unknown.connect
def on_unknown_task(name: str | None = None, id: str | None = None, **_: Any) -> None:  # noqa: A002 - the signal's names
    """A job's message for a task this worker does not have (a kind the API knows and this
    worker's version does not: a rolling upgrade that reached the API first). Celery drops such
    a message (it rejects it without requeueing and logs "unregistered task"), so the job stayed
    "queued" until its record expired, a day, with its upload kept and its webhook never sent.
    The job is failed now (503, to submit again), its upload deleted and its webhook sent; a
    job a newer worker already started, or that ended, is left alone. Runs in the worker's
    consumer, before any pool process."""
    if not id or not is_job_id(id):
        return
    jobs = store()
    try:
        record = jobs.get(id)
        if record is None or record.status != QUEUED:
            return
        log.error("job %s: this worker has no task %s (an older version than the API?); failing it, not run",
                  id, name)
        give_up(jobs, get_storage(), id, record.attempts, ModelError(
            f"no worker runs {record.kind} jobs now (the workers are older than the API); submit it again later"))
    except Exception:  # noqa: BLE001 - a signal handler's error is only logged; the record expires as before
        log.exception("job %s: could not fail the job of an unknown task %s", id, name)


def _run_leased(
    task: Task, job_id: str, kind: JobKind, jobs: JobStore, storage: Storage, lease: JobLease,
    legacy_params: dict[str, Any] | None,
) -> dict[str, Any]:
    # Celery's own time limits count from here (a download included); the job's own ends first
    task_started = time.monotonic()
    try:
        running = jobs.mark_running(job_id)
    except redis.RedisError as exc:
        # the lease is released on the way out (the ``with`` in _run); had the record been
        # changed after all (the answer was lost), the job is "running" with a lapsed lease and
        # the recovery pass queues it too: a second message finds it running or ended (harmless)
        raise _not_started(task, job_id, exc) from None
    if running is None or running.ended:
        # cancelled, or finished by the lease's previous holder, since the check above
        storage.delete_job(job_id)
        return _settle(task, running, job_id)
    attempt = running.attempts
    logs.bind(attempt=attempt)
    log.info("job started (attempt %d)", attempt)
    if running.lost >= settings.job_max_attempts:
        # a job whose worker died job_max_attempts times (a file that gets it OOM-killed, say)
        detail = f"the job's worker was lost {running.lost} times; giving up"
        log.error("job %s: %s", job_id, detail)
        return _settle(task, give_up(jobs, storage, job_id, attempt, ProcessingError(detail)), job_id)
    duration_limit = min(settings.max_audio_seconds, settings.sync_max_audio_seconds) if running.sync \
        else settings.max_audio_seconds
    task.update_state(state="PROGRESS", meta={"progress": 0.0, "step": "starting"})
    report = _progress_reporter(task, job_id, attempt, lease)
    outcome: tuple[str, dict[str, Any] | None, AnalysisError | None] | None = None
    timed_out = ProcessingError("job exceeded its time limit", status_code=504)
    try:
        with ExitStack() as stack:
            # the job's files together, fetched ones included, as the API holds its uploads
            seconds = DurationBudget(duration_limit)
            # a file whose header does not say its length: the job is held to the longest audio's limit
            unsure = [False]

            def path_of(key: str, audio: bool = True) -> Path:
                if not storage.exists(key):
                    if _cancelled(jobs, job_id):
                        # cancelled while its other files were read: the cancel removed its
                        # uploads at once; no fault of the storage (it was logged as one)
                        log.info("job %s cancelled while it started: its files were removed (%s)", job_id, key)
                        raise JobCancelled(job_id)
                    raise _missing_upload(running, key, jobs)
                path = stack.enter_context(storage.local_path(key))
                if audio:
                    # the API checked the header already; checked again here for jobs queued
                    # before, and because the worker is what an hour-long file would tie up
                    info = check_audio_limits(path, max_duration=duration_limit,
                                              min_sample_rate=settings.min_sample_rate,
                                              sandbox=settings.probe_limits())
                    unsure[0] = unsure[0] or info is None or info.duration is None
                    seconds.add(info)
                return path

            # all of a job's URLs together stay under the limit of one upload request
            budget = [settings.max_upload_bytes]

            def fetch(spec: FileField, url: str) -> str:
                # every chunk received reports progress: a cancel, a shutdown or a lost lease
                # stops the download too
                key, size = fetch_audio(
                    url, field=spec.url_name or spec.name, storage=storage, job_id=job_id, name=spec.name,
                    settings=settings, max_bytes=budget[0], max_duration=duration_limit,
                    progress=lambda: report(DOWNLOAD_STEP, 0.0),
                )
                budget[0] -= size
                return key

            params, files = _inputs(kind, running, legacy_params, path_of, fetch, kept=jobs.kept)
            engine = _engine()
            audio_s = duration_limit if unsure[0] else seconds.total
            limit = _time_limit(audio_s, time.monotonic() - task_started)
            of_audio = "audio of a length its header does not say" if unsure[0] else f"{audio_s:.0f} s of audio"
            timed_out = ProcessingError(f"the job ran past its time limit of {limit:.0f} s, for {of_audio}, "
                                        "and was stopped", status_code=504)
            with telemetry.job(engine.model_device) as peak, engine.decoding_at_most(duration_limit), \
                    engine.one_job(), JobDeadline(limit, settings.job_time_limit_grace_s,
                                lambda: _stuck(jobs, storage, job_id, attempt, timed_out)):
                result = kind.run(engine, files, params, report)
        outcome = (SUCCEEDED, {**result.model_dump(mode="json"), **peak}, None)
    except JobCancelled:
        pass  # recorded by whoever cancelled it
    except HandBack:
        # warm shutdown (Ctrl-C of `up`, a deploy): the job goes back to the queue now, its
        # upload stays, and another (or the restarted) worker runs it from the start
        if back_to_queue(jobs, running, attempt, lost=False):
            log.warning("job %s handed back to the queue: worker shutting down", job_id)
        return {"job_id": job_id, "status": QUEUED}
    except LeaseLost:
        log.error("job %s: lease lost mid-run; leaving the job to its new attempt", job_id)
        return {"job_id": job_id, "status": "superseded"}
    except SandboxUnavailable as exc:
        # the header check could not run (its fork server would not start, a starved host, a
        # reader killed by the OOM killer): the host's state at that moment, not the file's
        outcome = _short_of(jobs, running, attempt, f"the audio's header check could not run ({exc.detail})")
        if outcome is None:
            return {"job_id": job_id, "status": QUEUED}
    except AnalysisError as exc:
        outcome = (FAILED, None, _with_sync_hint(exc) if running.sync else exc)
    except (JobTimedOut, SoftTimeLimitExceeded):
        # the job's own limit (worker/deadline.py), or Celery's (a download that ran out its time)
        log.error("job %s: %s", job_id, timed_out.detail)
        outcome = (FAILED, None, timed_out)
    except redis.RedisError as exc:
        return _interrupted(job_id, exc)
    except Exception as exc:  # noqa: BLE001 - report, don't crash the worker or retry a poisoned job
        if out_of_room(exc):
            # the worker's disk filled (a file_url fetched, an object copied from S3): the
            # service's state, said as such (507, as the API says of its own) and not as an
            # internal error; retried here it would fill the same disk again
            log.error("job %s: the worker's storage is full: %s", job_id, exc)
            outcome = (FAILED, None, ProcessingError("the worker's storage is full; submit the job again later",
                                                     status_code=507))
        elif refused_by_storage(exc):
            # the worker's storage refused the job's file (a volume read-only, no permission, a
            # bucket out of reach): the job failed as "internal error" (500), lost for good, for
            # the service's state. Another worker (or this one, fixed) may reach it: back to the
            # queue as a lost attempt, and past the attempts a 503 that says so (as the API's)
            log.error("job %s: the worker's storage failed: %s: %s", job_id, type(exc).__name__, exc)
            outcome = _short_of(jobs, running, attempt, "the worker's storage refused the job's file "
                                "(read-only, no permission, or its bucket out of reach)")
            if outcome is None:
                return {"job_id": job_id, "status": QUEUED}
        elif _out_of_device_memory(exc):
            # the card's memory was taken when the job needed it (workers sharing a card, a
            # neighbour's peak)
            outcome = _short_of(jobs, running, attempt, "the GPU had no memory left for this job")
            if outcome is None:
                return {"job_id": job_id, "status": QUEUED}
        else:
            if not _device_works():
                _exit_for_device(job_id)
            outcome = (FAILED, None, _internal_error(job_id))
    try:
        if outcome is not None:
            status, result, error = outcome
            record, _ = jobs.finish(job_id, status, result=result, error=error.body() if error else None,
                                    attempt=attempt, notify=True)
        else:
            record = jobs.get(job_id)
    except redis.RedisError as exc:
        return _interrupted(job_id, exc)
    if record is not None and not record.ended:
        return _superseded(job_id, attempt, record)
    log.info("job %s", record.status if record is not None else "gone")
    # nothing of the audio is kept once the job ended, whatever the outcome
    storage.delete_job(job_id)
    if record is not None:
        _notify(record)
    return _settle(task, record, job_id)


def _short_of(jobs: JobStore, running: JobRecord, attempt: int, what: str) -> tuple[str, None, AnalysisError] | None:
    """The service lacked, for now, something the job needs (``what``): the job goes back to the
    queue as a lost attempt, its upload kept, to run when there is room (None); once it has lost
    ``job_max_attempts`` attempts (to this, another shortage or a dead worker: one budget, so a
    job cannot cycle for ever between causes), the failure to record: the service's state (503,
    submit it again later), never an internal error and never the file's fault."""
    if running.lost + 1 >= settings.job_max_attempts:
        log.error("job %s: %s, attempt %d", running.job_id, what, attempt, exc_info=True)
        return (FAILED, None, ProcessingError(
            f"{what}; the job has lost {running.lost + 1} attempts in all, the most it is given; "
            "submit it again later", status_code=503))
    log.warning("job %s: %s; back to the queue", running.job_id, what, exc_info=True)
    back_to_queue(jobs, running, attempt, lost=True)
    return None


def _superseded(job_id: str, attempt: int, record: JobRecord) -> dict[str, Any]:
    """This attempt ended (an outcome that was not written, or a cancel that was not one) while
    the job went on without it: its lease lapsed under it (the process stalled: a paused VM, a
    swapping host, a Redis away for a lease), the recovery pass queued the job again and another
    attempt started. The upload is that attempt's now, and stays. Deleted here as any ended
    job's, the stalled worker took the audio from under the job's next run, which failed with
    "uploaded file is no longer in storage" (or an internal error midway through a compare)."""
    log.error("job %s: attempt %d ended after the job moved on to attempt %d (%s); its outcome is not "
              "recorded and the upload stays for that attempt", job_id, attempt, record.attempts, record.status)
    return {"job_id": job_id, "status": "superseded"}


# the exit status of a pool process whose CUDA context failed (EX_SOFTWARE)
DEVICE_LOST_EXIT = 70
# the exit status of a pool process whose job did not stop past its time limit (EX_OSERR)
JOB_STUCK_EXIT = 71


def _time_limit(audio_s: float, elapsed_s: float) -> float:
    """Seconds a job with ``audio_s`` of audio may run its engine (worker/deadline.py), ending
    before Celery's soft limit, which counts from the task's start (``elapsed_s`` ago)."""
    own = settings.job_time_limit_floor_s + settings.job_time_limit_per_audio_s * audio_s
    return max(1.0, min(own, settings.task_soft_time_limit_s - elapsed_s))


def _stuck(jobs: JobStore, storage: Storage, job_id: str, attempt: int, error: ProcessingError) -> None:
    """The job's engine did not stop at its time limit (a hang in native code, which no signal
    reaches): fail the job, then end this process, as _exit_for_device does. Its message is
    handed out again (``task_reject_on_worker_lost``) and skipped, the job having ended; a
    prefork parent starts a fresh child, a solo worker is restarted by its supervisor. Left to
    Celery's hard limit, the job was killed after 3 h 5 min and run again, up to
    ``job_max_attempts`` times. Runs in the deadline's timer thread."""
    log.critical("job %s: stuck past its time limit (%s); failing it and ending this process", job_id, error.detail)
    try:
        give_up(jobs, storage, job_id, attempt, error)
    except Exception:  # noqa: BLE001 - Redis away: the lease lapses and recovery takes the job
        log.exception("job %s: could not record its failure", job_id)
    _end_process(JOB_STUCK_EXIT)


def _end_process(status: int) -> None:
    """Exit this pool process now, its log written out first (``os._exit`` runs no clean-up)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(status)


def _out_of_device_memory(exc: BaseException) -> bool:
    from engine.core import built_engine

    engine = built_engine()
    return engine is not None and engine.ran_out_of_memory(exc)


def _device_works() -> bool:
    from engine.core import built_engine

    engine = built_engine()
    return engine is None or engine.device_works()


def _exit_for_device(job_id: str) -> None:
    """End this process: its CUDA context failed for good (call it in the ``except``).

    Failing the job and going on would fail every later job of this process too (a device-side
    assert is sticky). Exiting is the path a process killed mid-job already takes: a prefork
    parent starts a fresh child with a new context, the job's message is handed out again
    (``task_reject_on_worker_lost``), the dead holder's lease is taken over at once, and a job
    that kills its process ``job_max_attempts`` times is failed (worker/recovery.py). A solo
    worker exits whole and is restarted by its supervisor (compose, Kubernetes)."""
    log.critical("job %s: the CUDA device failed and stays failed in this process; exiting so that a fresh "
                 "process runs the job again", job_id, exc_info=True)
    _end_process(DEVICE_LOST_EXIT)


def _with_sync_hint(exc: AnalysisError) -> AnalysisError:
    """A synchronous job's 413 with the hint the API gives when the header states the length
    (shared.audio_limits.SYNC_HINT): the same file goes through /jobs/*, whose limit is longer.
    A file whose header states none (a browser's live WebM, an ADTS stream) is found too long only
    here, while it is decoded or its samples counted, and its 413 ("audio is longer than the limit
    of 1800 s") said nothing of /jobs/*, where docs/service.md promises it for this 413."""
    if not isinstance(exc, AudioTooLongError) or SYNC_HINT in exc.detail:
        return exc
    return AudioTooLongError(exc.detail + SYNC_HINT, status_code=exc.status_code)


def _internal_error(job_id: str) -> ProcessingError:
    """The error a client sees for an exception nobody expected (call it in the ``except``).

    The exception's own text (a file path of the server, a library's internals, a query) goes
    only to the worker's log, with a short reference that the client's message quotes, so an
    operator finds the traceback from what a client reports. AnalysisErrors are meant for
    clients and keep their messages; this is for everything else.
    """
    reference = uuid.uuid4().hex[:12]
    log.exception("job %s failed (error %s)", job_id, reference)
    return ProcessingError(
        f"internal error while processing the job (error {reference}, job {job_id}); "
        "the service's operators can look it up in the worker's log"
    )


def _inputs(kind: JobKind, record: JobRecord, legacy_params: dict[str, Any] | None,
            path_of: Callable[..., Path],
            fetch: Callable[[FileField, str], str] | None = None, *,
            kept: Callable[[str], list[Any] | None] | None = None) -> tuple[Params, dict[str, Any]]:
    """The job's typed parameters and local audio paths, as the API stored them; audio given by
    URL is fetched into storage first (``fetch(field, url) -> storage key``; single-file fields only).
    Parameters kept apart from the record (voiceprints) are loaded by digest (``kept``:
    ``JobStore.kept``); records written before they were kept apart carry them inline and run as
    they are.

    Records queued by a version that stored the embedding file itself (not its numbers) have it
    parsed here, with the same parser the API uses now.
    """
    raw = dict(record.params or legacy_params or {})
    stored = dict(record.files)
    if not stored and not record.urls:
        # messages from before the record held parameters carried upload keys among them
        stored = {f.name: raw.pop(f.name) for f in kind.files if isinstance(raw.get(f.name), str)}
    for spec in kind.files:
        if spec.parse is not None and spec.name in stored:
            with open(path_of(stored[spec.name], audio=False), "rb") as fh:
                raw[spec.into or spec.name] = spec.parse(fh.read(), raw.get(f"{spec.name}_filename"), settings)
    for name, digest in record.kept_apart.items():
        value = (kept or store().kept)(digest)
        if value is None:
            # kept as long as the record itself (shared/jobs.py KEPT_APART_MARGIN_S): only a
            # Redis that lost keys (a flush, an evicting policy) gets here
            raise ProcessingError(f"{name}: the values this job was submitted with are no longer stored; "
                                  "submit the job again")
        raw[name] = value
    fetchable = record.urls if fetch is not None else {}
    missing = [f.name for f in kind.audio_files if not _upload_keys(f, stored) and f.name not in fetchable]
    if missing:
        raise ProcessingError(f"job record names no upload for {', '.join(missing)}")
    params = kind.params.model_validate({k: v for k, v in raw.items() if k in kind.params.model_fields})
    for spec in kind.audio_files:
        if not _upload_keys(spec, stored) and fetch is not None:
            stored[spec.name] = fetch(spec, record.urls[spec.name])
    files: dict[str, Any] = {}
    for spec in kind.audio_files:
        paths = [path_of(key) for key in _upload_keys(spec, stored)]
        files[spec.name] = paths if spec.multiple else paths[0]
    return params, files


def _upload_keys(spec: Any, stored: dict[str, str]) -> list[str]:
    """Storage keys of one upload field; a multiple-file field's are ``<name>.0``, ``<name>.1``..."""
    if not spec.multiple:
        return [stored[spec.name]] if spec.name in stored else []
    numbered = []
    for name, key in stored.items():
        head, _, index = name.rpartition(".")
        if head == spec.name and index.isdigit():
            numbered.append((int(index), key))
    return [key for _, key in sorted(numbered)]


def _interrupted(job_id: str, exc: Exception) -> dict[str, Any]:
    # Redis went away mid-job. The upload stays: once Redis is back, the lease lapses and the
    # recovery pass runs the job again (worker/recovery.py); deleting it here lost the job.
    log.error("job %s interrupted, job store unreachable (%s); it will run again", job_id, exc)
    raise JobInterrupted("job store unreachable") from None


def _enqueue(job_id: str, kind: str, queue: str | None = None) -> None:
    # level 0, the first served whatever its tenant's backlog: a job handed back or taken from a
    # lost worker (recovery) already waited its turn once
    send_job(app, KINDS[kind], job_id, queue or settings.queue_name, level=0)


def back_to_queue(jobs: JobStore, record: JobRecord, attempt: int, *, lost: bool) -> bool:
    """Running attempt ``attempt`` of ``record``'s job to its queue again; False when the job had
    moved on meanwhile (another worker started it, it ended). The message goes first: a process
    that dies between the two leaves a duplicate message (its copy finds the job running or
    ended, see _run) or a running record under a lease that lapses (recovery queues it), never
    a queued record that no message names."""
    _enqueue(record.job_id, record.kind, record.queue)
    # conditional on the attempt: if a worker took the new message and started the job in
    # between, the record changed and this does nothing
    return jobs.requeue(record.job_id, attempt, lost=lost) is not None


def _notify(record: JobRecord) -> None:
    if record.webhook_url and record.ended:
        # owed from now on (a job cancelled by the API while it ran, a redelivered copy of an
        # ended job): due soon, should this process die before the message is sent (an earlier
        # due time stays: finish set one for the job's own end) ...
        jobs, due = store(), None
        try:
            jobs.webhook_due(record.job_id, jobs.webhook_grace_s(), keep_earlier=True)
            due = jobs.webhook_due_at(record.job_id)
        except redis.RedisError as exc:
            log.warning("job %s: the webhook's due time was not recorded (%s)", record.job_id, exc)
        deliver_webhook.apply_async((record.job_id,), queue=settings.webhook_queue_name)
        # ... and once the message waits in its queue, however long that queue, only after the
        # broker's own visibility timeout: a worker that takes it sets a due time of its own
        if due is not None:
            try:
                jobs.webhook_queued(record.job_id, due, float(settings.visibility_timeout_s))
            except redis.RedisError as exc:
                log.warning("job %s: the webhook's due time was not moved on (%s)", record.job_id, exc)


def _engine():
    from engine.core import get_engine

    return get_engine()


# max_retries=None: an analysis task retries only to wait for a copy of itself that is running
# elsewhere (see _run), for as long as that copy runs

# throws: an expected outcome, logged without a traceback
_ANALYSIS = {"bind": True, "max_retries": None, "throws": (JobFailed, JobInterrupted)}


def _register(kind: JobKind) -> Task:
    # params: only in messages queued before the job record held them
    def run(self: Task, job_id: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        with logs.bound(job_id=job_id, kind=kind.name):
            return _run(self, job_id, kind, params)

    run.__name__ = run.__qualname__ = kind.name
    run.__doc__ = f"{kind.summary} (job kind {kind.name!r}, shared/kinds.py)."
    return app.task(name=kind.task_name, **_ANALYSIS)(run)


for _kind in KINDS.values():
    _register(_kind)


def webhook_payload(record: JobRecord) -> dict[str, Any]:
    """The record as the webhook carries it: without its webhook state, and without ``result``
    when the job asked for the status only (``webhook_payload=status``)."""
    leave_out = {"webhook"} | ({"result"} if record.webhook_payload == "status" else set())
    return {k: v for k, v in record.public().items() if k not in leave_out}


def webhook_countdown(attempt: int) -> float:
    """Seconds before the retry that follows failed attempt ``attempt``: webhook_backoff_s,
    doubling, capped at webhook_backoff_max_s (what Celery's retry_backoff counted)."""
    return float(min(settings.webhook_backoff_max_s, settings.webhook_backoff_s * 2 ** max(0, attempt - 1)))


@app.task(bind=True, name=WEBHOOK_TASK, max_retries=settings.webhook_max_retries)
def deliver_webhook(self: Task, job_id: str) -> dict[str, Any]:
    """POST the finished job to its webhook once, retrying with exponential backoff.

    Every delivery owed has a due time in Redis (``JobStore.webhook_due``), pushed on as the task
    starts and as it schedules a retry, and cleared once delivered or failed for good: a worker
    killed while delivering (or while holding the retry) leaves it past due, and the recovery
    pass sends it again under a new task id (worker/recovery.py), which the claim below lets
    through and a late copy of the lost task does not."""
    jobs = store()
    delivered = jobs.key("webhook", job_id, "delivered")
    claim = jobs.key("webhook", job_id, "claim")
    slots: webhook_share.TenantSlots | None = None
    try:
        record = jobs.get(job_id)
        if record is None or not record.webhook_url:
            jobs.webhook_settled(job_id)
            return {"job_id": job_id, "delivered": False, "reason": "no job or no webhook"}
        if jobs.redis.exists(delivered):
            jobs.webhook_settled(job_id)
            return {"job_id": job_id, "delivered": False, "reason": "already delivered"}
        # one delivery task owns each job: a redelivered job enqueues a second delivery task, which
        # stops here, while the owner's own retries (same task id) pass
        if not jobs.redis.set(claim, self.request.id, nx=True, ex=jobs.ttl) and jobs.redis.get(claim) != self.request.id:
            return {"job_id": job_id, "delivered": False, "reason": "another delivery owns this job"}
        # counted from the record too: a delivery task redelivered after its worker died starts its
        # own retry count again, the receiver's count goes on
        attempt = max(self.request.retries, record.webhook.attempts if record.webhook else 0) + 1
        if attempt > self.max_retries + 1:
            # every attempt was made (the last one's worker died during it, or it raised): done
            jobs.set_webhook(job_id, status="failed")
            jobs.webhook_settled(job_id)
            return {"job_id": job_id, "delivered": False, "reason": "no attempts left"}
        # one of its tenant's slots, or no thread for it now: a tenant whose receivers hang must
        # not hold every delivery thread (worker/webhook_share.py). Not run in a pool (apply()):
        # there are no threads to share
        cap = webhook_share.tenant_cap(settings.webhook_tenant_max_in_flight)
        if cap is not None and not self.request.is_eager:
            slots = webhook_share.TenantSlots(jobs, record.owner)
            if not slots.take(self.request.id, cap, jobs.webhook_grace_s()):
                raise _defer(self, jobs, job_id, slots, cap)
        # recorded before the POST: a worker killed during it still counts the attempt (the next
        # says it is the next, and the retries stay bounded however often that happens)
        jobs.webhook_due(job_id, jobs.webhook_grace_s())
        jobs.set_webhook(job_id, attempts=attempt)
    except redis.RedisError as exc:
        if slots is not None:
            _give_back(slots, self.request.id)
        # raised, this acked the delivery's only message: the webhook was never sent. Handed
        # back, the same message (same task id, so its claim still passes) runs again
        raise _not_started(self, job_id, exc) from None

    try:
        code = _post(record, job_id, attempt)
    finally:
        if slots is not None:
            _give_back(slots, self.request.id)
    if isinstance(code, webhooks.WebhookDeliveryError):
        exc = code
        final = attempt > self.max_retries
        if not jobs.set_webhook(job_id, owner=self.request.id, status="failed" if final else "retrying",
                                attempts=attempt, last_error=str(exc)):
            # this task stalled mid-POST past its due time and the recovery pass handed the
            # delivery to another task (which may have delivered it): that one's to finish
            return {"job_id": job_id, "delivered": False, "reason": "another delivery took over"}
        if final:
            jobs.webhook_settled(job_id)
            return {"job_id": job_id, "delivered": False}
        countdown = webhook_countdown(attempt)
        jobs.webhook_due(job_id, countdown + jobs.webhook_grace_s())
        raise self.retry(exc=exc, countdown=countdown)
    if jobs.redis.set(delivered, utc_now(), nx=True, ex=jobs.ttl):
        jobs.set_webhook(job_id, status="delivered", attempts=attempt, delivered_at=utc_now(), last_error=None)
    jobs.webhook_settled(job_id)
    return {"job_id": job_id, "delivered": True, "status_code": code, "attempts": attempt}


def _post(record: JobRecord, job_id: str, attempt: int) -> int | webhooks.WebhookDeliveryError:
    """One attempt at ``record``'s webhook: the receiver's 2xx status, or why it failed."""
    try:
        return webhooks.post(
            record.webhook_url, job_id, webhook_payload(record),
            webhooks.signing_secret(settings.webhook_secret.get_secret_value(), record.owner),
            settings.webhook_timeout_s, allow_private=settings.webhook_allow_private_addresses, attempt=attempt,
            deadline_s=settings.webhook_deadline_s,
        )
    except webhooks.WebhookDeliveryError as exc:
        return exc


def _give_back(slots: webhook_share.TenantSlots, task_id: str) -> None:
    try:
        slots.give_back(task_id)
    except redis.RedisError as exc:
        # the slot lapses by itself (its deadline and a margin): the tenant runs one short till then
        log.warning("webhook delivery %s: its tenant slot was not given back (%s)", task_id, exc)


def _defer(task: Task, jobs: JobStore, job_id: str, slots: webhook_share.TenantSlots, cap: int) -> Exception:
    """Send this delivery again after a short countdown, as it is: its tenant holds all of its
    slots. Not an attempt (the retry count travels unchanged, nothing is recorded but the due
    time), and never dropped: the due time is pushed past the countdown first, so a worker killed
    while it holds the deferred message leaves it past due, for the recovery pass to send again.
    The countdown grows with the tenant's deferred deliveries (webhook_share.defer_countdown), so
    however many wait, they come back a bounded number of times a second."""
    countdown = webhook_share.defer_countdown(settings.webhook_tenant_defer_s, slots.waiting + 1, cap,
                                              settings.webhook_tenant_defer_looks)
    jobs.webhook_due(job_id, countdown + jobs.webhook_grace_s())
    slots.wait(task.request.id, countdown + jobs.webhook_grace_s())
    again = task.signature_from_request(task.request, countdown=countdown, retries=task.request.retries)
    try:
        again.apply_async()
    except Exception as exc:  # noqa: BLE001 - the broker's (kombu's) errors are not Redis's
        # not sent: this message goes back to its queue instead of being acked and lost
        log.warning("webhook delivery for job %s: deferral not sent (%s); message handed back", job_id, exc)
        return Reject(f"deferral not sent: {type(exc).__name__}", requeue=True)
    log.debug("webhook delivery for job %s deferred %.1f s: its tenant's deliveries in flight are at the cap",
             job_id, countdown)
    # what self.retry raises: the worker acks this message and records a retry, not a failure
    return Retry(when=countdown, sig=again)
