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
message (:func:`fail_interrupted_submissions`), and sends again the message of a queued job that
is in no queue and no worker's hands (:func:`recover_unqueued_jobs`).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

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


# Where a message of the service names its job: the task id is the job id (shared/queue.py,
# send_job), in its headers' "id" (kombu's JSON). A webhook delivery's id is its own.
_MESSAGE_ID = re.compile(r'"id"\s*:\s*"([0-9a-f]{32})"')
# a queue's lists are read this many messages at a time (about 1 KB each)
LIST_PAGE = 1000
# at most this many of the oldest queued jobs of each tenant's waiting set, and of all, per pass
OLDEST_PER_SET, MOST_PER_PASS = 100, 1000
_indexed = {"done": False}


def _unqueued_key(store: JobStore) -> str:
    # "<job id>:<attempts>" -> when (Redis clock) a pass first found its message nowhere
    return store.key("unqueued")


def note_stalled_consumer(store: JobStore, settings: Settings) -> None:
    """Said by a pool process whose worker's main process stopped making progress (frozen by
    SIGSTOP or a paused VM, its loop hung; worker.lifecycle.main_stalled): that process's BRPOP
    may have been waiting in Redis, which then hands the next message pushed to its queue to a
    socket nobody reads, in no list and no unacked set. Such a job waited for the look at jobs
    queued over ``job_unqueued_after_s`` (300 s) and two passes: six minutes lost, while the stall
    is known here within seconds. So, for ``job_unqueued_after_s`` from now (then the usual look
    covers every job queued before the stall), :func:`recover_unqueued_jobs` looks at every
    confirmed queued job whatever its age: the same two passes an interval apart, the same
    once-per-spell send, only sooner; age was never its evidence, only what made a look worth
    its reads (a stall is rare, and the look stays one worker's per interval)."""
    import math

    store.redis.set(store.consumer_lost_key(), "1", ex=max(1, math.ceil(settings.job_unqueued_after_s)))


def _ids_in_unacked(client: Any) -> set[str]:
    found: set[str] = set()
    for _tag, raw in client.hscan_iter(UNACKED, count=LIST_PAGE):
        found.update(_MESSAGE_ID.findall(raw))
    return found


def _ids_in_queue(client: Any, queue: str) -> set[str]:
    """The job ids of every message in ``queue``'s lists, read from the head (index 0) in pages:
    kombu pushes at the head (LPUSH, a restore's RPUSH at the tail) and pops at the tail (BRPOP),
    so no message that stays in the list is skipped (one pushed meanwhile may be read twice)."""
    from shared.queue import queue_keys

    found: set[str] = set()
    for key in queue_keys(queue):
        start = 0
        while True:
            page = client.lrange(key, start, start + LIST_PAGE - 1)
            found.update(_MESSAGE_ID.findall("\n".join(page)))
            if len(page) < LIST_PAGE:
                break
            start += LIST_PAGE
    return found


def recover_unqueued_jobs(store: JobStore, settings: Settings) -> list[str]:
    """One pass over confirmed queued jobs whose message is in no queue list and no worker's hands:
    kombu's Redis transport takes a message with BRPOP and only then, from the worker, writes it to
    its unacked set, so a connection cut in between (a stall past the socket timeout, a worker host
    lost at that moment, a proxy) leaves it nowhere; so does a flushed or trimmed queue, or a
    failover that lost the list's last writes but not the record's. Nothing else would ever run
    such a job: it stayed "queued" until its record expired. Returns the ids sent again.

    Age is no evidence (a job waits hours behind a backlog): jobs queued over
    ``job_unqueued_after_s`` (the tenants' waiting sets, JobStore.waiting_sets) are only the
    candidates. When there are any, one pass of all workers' in each ``job_recovery_interval_s``
    (a lock) reads kombu's unacked messages, the candidates' queues' lists, and the unacked
    messages again (a message moving from a list to a worker meanwhile is seen in the second read,
    one moving back in the first). A candidate found in none of them is noted; found so on a later
    pass that started at least an interval after the note ended, its message is sent again (level
    0: it waited its turn), once per queued spell (its attempts). A message between two places
    (microseconds: BRPOP and the unacked write, a restore, an ack) is never missed by two passes an
    interval apart; and should a copy still exist, it finds the job running (it waits) or ended
    (it skips it), as any copy does (worker.tasks._run). While ``JobStore.consumer_lost_key`` is
    set (a worker's heartbeat lapsed without its stopping, its main process stalled: its waiting
    BRPOP may have taken the next message pushed, into a socket nobody reads), every confirmed
    queued job is a candidate, whatever its age: the job runs seconds after, not minutes. Unconfirmed submissions are
    fail_interrupted_submissions' alone, and held or reserved messages are in the unacked set.

    Cost: with no candidate, one script over the index of waiting sets and one pipelined
    ZRANGEBYSCORE per tenant and queue. With candidates, once per interval across all workers:
    their records (one pipeline), the unacked hash (HSCAN, twice), and each of their queues' four
    lists in LRANGE pages of LIST_PAGE: a queue of 10,000 messages is ten round trips and about
    10 MB read and searched."""
    import math

    from worker.tasks import _enqueue

    client = store.redis
    if not _indexed["done"]:
        # once per process: waiting sets an API of an earlier release wrote, never indexed
        store.index_waiting_sets(client.scan_iter(match=store.key("waiting", "*"), count=1000, _type="zset"))
        _indexed["done"] = True
    sightings = _unqueued_key(store)
    # any age while a worker's main process stalled lately (note_stalled_consumer), or a worker
    # stopped heartbeating without stopping (frozen whole, killed, its host lost: the pruning of
    # the heartbeats' index, here at each pass, notes it)
    store.prune_workers()
    after_s = 0.0 if client.exists(store.consumer_lost_key()) else settings.job_unqueued_after_s
    old = store.waiting_before(store.waiting_sets(), store.clock() - after_s, OLDEST_PER_SET)
    if not old:
        client.delete(sightings)
        return []
    interval = settings.job_recovery_interval_s
    if not client.set(store.key("unqueued", "scan"), "1", nx=True, px=max(1, int(interval * 1000))):
        return []  # another worker's pass reads the queues this interval
    candidates = store.queued_confirmed(list(dict.fromkeys(old))[:MOST_PER_PASS])
    started = store.clock()
    present = _ids_in_unacked(client)
    for queue in sorted({record.queue or settings.queue_name for record in candidates}):
        present |= _ids_in_queue(client, queue)
    present |= _ids_in_unacked(client)
    ended = store.clock()
    missing = {f"{r.job_id}:{r.attempts}": r for r in candidates if r.job_id not in present}
    noted = dict(client.zrange(sightings, 0, -1, withscores=True))
    stale = [member for member in noted if member not in missing]
    handled: list[str] = []
    with client.pipeline(transaction=False) as pipe:
        for member in stale:
            pipe.zrem(sightings, member)
        for member, record in missing.items():
            first = noted.get(member)
            if first is None:
                pipe.zadd(sightings, {member: ended}, nx=True)
            elif first <= started - interval and _send_again(store, settings, record, _enqueue):
                pipe.zrem(sightings, member)
                handled.append(record.job_id)
        pipe.expire(sightings, math.ceil(store.queued_life_s))
        pipe.execute()
    return handled


def _send_again(store: JobStore, settings: Settings, record: Any, enqueue: Any) -> bool:
    """Send a lost message once per queued spell (the job's attempts), whichever pass gets here
    first, while the job is still queued, confirmed, at those attempts."""
    import math

    mark = store.key("job", record.job_id, "resent", "lost", str(record.attempts))
    if not store.redis.set(mark, "1", nx=True, ex=math.ceil(store.queued_life_s)):
        return False
    now = store.queued_confirmed([record.job_id])
    if not now or now[0].attempts != record.attempts:
        return False
    enqueue(record.job_id, record.kind, record.queue)
    log.warning("job %s: queued %.0f s or more with its message in no queue and no worker's hands on two passes "
                "%.0f s apart (lost between the broker and a worker, or the queue was emptied); sent again",
                record.job_id, settings.job_unqueued_after_s, settings.job_recovery_interval_s)
    return True


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
