"""Jobs left "running" by a worker that is gone: started again, or failed after too many tries.

With ``acks_late`` the broker hands an unacked job out again only after its visibility timeout
(6 h, longer than any job), or when a prefork pool child dies under a living parent. A worker
killed whole (SIGKILL of the solo pool `up` runs, the OOM killer, a host lost) or a Redis crash
mid-job leaves the job "running" for those hours. Every running attempt holds a lease in Redis
(worker/lease.py), refreshed every third of ``job_lease_s``; each worker's heartbeat thread looks
every ``job_recovery_interval_s`` for running jobs whose lease has lapsed (or whose holder was a
process of this host that no longer exists) and puts them back on the queue, or fails them once
their worker was lost ``job_max_attempts`` times, deleting the upload and sending the webhook as
any failure does.

A requeued job that is also redelivered later by the broker is safe: the copy finds the job
running under a live lease (and waits) or ended (and skips it), see worker.tasks._run.

The same pass fails jobs whose submission was cut off between their record and their queue
message (:func:`fail_interrupted_submissions`).
"""

from __future__ import annotations

import logging
import os

from shared.errors import ProcessingError
from shared.jobs import QUEUED, RUNNING, JobStore
from shared.settings import Settings
from shared.storage import Storage
from worker.lease import holder_alive

log = logging.getLogger(__name__)


def _lease_alive(store: JobStore, job_id: str) -> bool:
    raw = store.redis.get(store.key("job", job_id, "lease"))
    if raw is None:
        return False
    token = raw.decode() if isinstance(raw, bytes) else raw
    try:
        if int(token.split("|")[1]) == os.getpid():
            return True  # a job this very process is running (the solo pool's heartbeat thread)
    except (IndexError, ValueError):
        return True
    return holder_alive(token)


def recover_stalled_jobs(store: JobStore, storage: Storage, settings: Settings) -> list[str]:
    """One pass; returns the ids of the jobs it requeued or failed."""
    from worker.tasks import back_to_queue, give_up

    handled: list[str] = []
    for job_id in store.running_ids():
        record = store.get(job_id)
        if record is None or record.status != RUNNING:
            store.forget_running(job_id)
            continue
        if _lease_alive(store, job_id):
            continue
        attempt = record.attempts
        lost = record.lost + 1
        if lost >= settings.job_max_attempts:
            detail = f"the job's worker was lost {lost} times; giving up"
            if give_up(store, storage, job_id, attempt, ProcessingError(detail)) is not None:
                log.error("job %s: %s", job_id, detail)
                handled.append(job_id)
            continue
        if back_to_queue(store, record, attempt, lost=True):
            log.warning("job %s: its worker is gone (lease expired); queued again after attempt %d", job_id, attempt)
            handled.append(job_id)
    return handled


def recover_held_jobs(store: JobStore, settings: Settings) -> list[str]:
    """One pass over job messages a worker held (a retry waiting for the job's confirmation,
    ``JobStore.hold_message``) and did not run again by their due time: the worker died holding
    it, and the broker would hand it out again only after its visibility timeout (6 h). A job
    still queued and never started gets its message again (at level 0: it waited its turn); one
    that started, ended or is gone needs none. Returns the ids sent again."""
    from worker.tasks import _enqueue

    handled: list[str] = []
    for job_id in store.holds_past_due():
        # due again a lease from now, should this process die before the message is sent; taken
        # by one pass alone
        if not store.take_over_hold(job_id, settings.job_lease_s):
            continue
        record = store.get(job_id)
        if record is not None and record.status == QUEUED and not record.attempts:
            _enqueue(job_id, record.kind, record.queue)
            log.warning("job %s: the worker that held its message (waiting for its confirmation) was not heard "
                        "from past its due time (it died?); its message is sent again", job_id)
            handled.append(job_id)
        store.drop_hold(job_id)
    return handled


# kombu's Redis transport keeps each message a worker took and has not acked yet in a hash (the
# message) and a sorted set (when it was taken, by that worker's clock), under these names
# (Channel.unacked_key and unacked_index_key; this service sets no global_keyprefix)
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"


def reserved_for_s(settings: Settings) -> float:
    """How long a queued job's message may be held by a worker before the pass sends it again:
    two leases and a pass, past the few seconds a worker holds one it is about to start (or waits
    to see confirmed)."""
    return 2 * settings.job_lease_s + settings.job_recovery_interval_s


def recover_reserved_jobs(store: JobStore, settings: Settings) -> list[str]:
    """One pass over job messages a worker has held for longer than :func:`reserved_for_s` (in
    kombu's unacked set) whose job is still queued: the worker took it and never started it. Its
    pool process keeps dying as it loads the models (the message waits in the parent for a process
    that never becomes ready), it died between taking the message and starting the job, or it
    holds the message behind a job that runs for hours. The broker hands such a message out again
    only after its visibility timeout (6 h), while another worker could run the job now: its message
    is sent again (level 0), once per held message. A copy that runs after the job started or ended
    waits for it or skips it, as any copy does. Returns the ids sent again."""
    import json
    import time

    from shared.jobs import is_job_id
    from shared.queue import WEBHOOK_TASK
    from worker.tasks import _enqueue

    older_than_s = reserved_for_s(settings)
    tags = store.redis.zrangebyscore(UNACKED_INDEX, "-inf", time.time() - older_than_s, start=0, num=100)
    handled: list[str] = []
    for tag, raw in zip(tags, store.redis.hmget(UNACKED, tags) if tags else ()):
        try:
            headers = json.loads(raw)[0].get("headers") or {}
            task, job_id = headers.get("task"), headers.get("id")
        except (TypeError, ValueError, AttributeError, IndexError):
            continue  # gone meanwhile (acked), or not a message of this service
        if not isinstance(task, str) or not task.startswith("audio.") or task == WEBHOOK_TASK \
                or not isinstance(job_id, str) or not is_job_id(job_id):
            continue
        record = store.get(job_id)
        if record is None or record.status != QUEUED:
            continue
        # once per held message (its delivery tag), whichever worker's pass gets here first: a
        # message held behind a job of hours is sent again once, not at every pass
        if not store.redis.set(store.key("job", job_id, "resent", str(tag)), "1", nx=True,
                               ex=max(1, int(settings.visibility_timeout_s))):
            continue
        _enqueue(job_id, record.kind, record.queue)
        log.warning("job %s: its message has been held by a worker for over %.0f s without the job starting; "
                    "sent again", job_id, older_than_s)
        handled.append(job_id)
    return handled


def fail_interrupted_submissions(store: JobStore, storage: Storage, settings: Settings) -> list[str]:
    """One pass over jobs whose submission was not confirmed within ``job_submit_grace_s``
    (``JobStore.confirm_queued``): the API died, or Redis or the broker failed, between writing
    the record and answering 202. Each still queued and never started is failed, saying to submit
    it again, and its upload deleted: its client got no answer and submits it again, so it must
    not run later (a message sent before the API died finds it ended and is skipped), and it must
    not stay "queued" in its tenant's listing for a day. A job genuinely waiting in a long queue
    was confirmed when it was accepted and is never looked at here. Returns the ids it failed."""
    failed: list[str] = []
    for job_id in store.unconfirmed(settings.job_submit_grace_s):
        record = store.get(job_id)
        if record is None or record.ended:
            store.forget_unconfirmed(job_id)  # expired, or ended by itself (withdrawn, cancelled, run)
            continue
        if record.status != QUEUED or record.attempts:
            # its message went out before the submission stopped and a worker took it: it runs
            # to its end (stopping it midway would only waste the work); looked at again later
            store.look_again_later(job_id)
            continue
        if fail_interrupted(store, storage, job_id, settings):
            failed.append(job_id)
    return failed


def fail_interrupted(store: JobStore, storage: Storage, job_id: str, settings: Settings) -> bool:
    """Fail a job whose submission was not confirmed within ``job_submit_grace_s`` and delete
    its upload (the pass above, or the worker that took its message, worker.tasks); False when
    it was confirmed, started or ended meanwhile (``JobStore.fail_interrupted``)."""
    if store.fail_interrupted(job_id) is None:
        return False
    storage.delete_job(job_id)
    log.error("job %s: its submission was interrupted before the job was queued (not confirmed within %.0f s); "
              "failed, not run, its upload deleted", job_id, settings.job_submit_grace_s)
    return True


def recover_lost_deliveries(store: JobStore, settings: Settings) -> list[str]:
    """One pass over webhook deliveries past their due time (``JobStore.webhook_due``): each is
    sent again under a new task id, which takes over the delivery's claim, so the lost task's
    message, handed out again by the broker hours later, stops at its claim. Returns the job ids."""
    import uuid

    from shared.queue import WEBHOOK_TASK
    from worker.tasks import app

    handled: list[str] = []
    for job_id in store.webhooks_past_due():
        task_id = uuid.uuid4().hex
        # due again soon, in case this process dies before the message is sent
        due = store.take_over_webhook(job_id, task_id, store.webhook_grace_s())
        if due is None:
            continue  # settled meanwhile, or another worker's pass took it
        app.send_task(WEBHOOK_TASK, args=(job_id,), task_id=task_id, queue=settings.webhook_queue_name)
        # queued: the task sets its own due time once a worker takes it
        store.webhook_queued(job_id, due, float(settings.visibility_timeout_s))
        log.warning("job %s: its webhook delivery was not heard from past its due time (its worker died?); "
                    "sent again", job_id)
        handled.append(job_id)
    return handled
