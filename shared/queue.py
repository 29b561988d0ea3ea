"""The Celery application both processes build: Redis broker and result backend, job kinds'
task names, and the rules a GPU worker needs (late ack, one job at a time).

The API builds it to *send* tasks, by name, and never imports the task code or the engine; a
worker builds it with ``include=["worker.tasks"]`` (worker/celery_app.py), which also registers
the worker's signal handlers. Start a worker pinned to one GPU with::

    CUDA_VISIBLE_DEVICES=0 celery -A worker.celery_app worker -Q audio --concurrency 1 -n gpu0@%h

and one for webhook deliveries (no models)::

    AUDIO_ANALYSIS_WORKER_LOAD_MODELS=false celery -A worker.celery_app worker -Q webhooks -c 4 -n hooks@%h
"""

from __future__ import annotations

from typing import Any, Sequence

from celery import Celery
from kombu.transport.redis import PRIORITY_STEPS
from kombu.transport.redis import Channel as RedisChannel

from shared.kinds import JobKind
from shared.settings import Settings, get_settings

WEBHOOK_TASK = "audio.deliver_webhook"
# How long any Redis client of the service waits on a reply, and to connect: every command it sends
# answers in milliseconds (BRPOP waits 1 s, kombu's brpop_timeout), so past this the connection is
# taken for dead and the command fails as an unreachable Redis does (the caller retries, hands the
# job back, or answers 503). Without it, a connection whose Redis went away without closing it
# waits as long as the kernel's TCP retries (some 15 min on a lost route), or for ever.
REDIS_SOCKET_TIMEOUT_S = 10.0
REDIS_CONNECT_TIMEOUT_S = 5.0


def make_celery(settings: Settings | None = None, *, include: Sequence[str] = ()) -> Celery:
    settings = settings or get_settings()
    app = Celery("audio_analysis", broker=settings.redis_url, backend=settings.redis_url, include=list(include))
    transport = {
        # an unacked job is redelivered only after this; it must exceed the longest job or a
        # running hour-long diarization would be handed to a second worker
        "visibility_timeout": settings.visibility_timeout_s,
        # fair ordering between tenants by kombu's own Redis priorities (fair_priority): a
        # message of priority p goes to its own list (queue_keys), and a worker's BRPOP names
        # every queue's lists lowest priority first, so Redis hands out priority 0 of any queue
        # before the next. The steps are kombu's defaults (0, 3, 6, 9), set here only to say so:
        # a worker of an earlier release, which set none, listens on the same four lists, so an
        # API upgraded first sends nothing it cannot take (with steps of its own, a job at 1, 2,
        # 4 or 5 waited in a list no such worker read). kombu's default separator is kept too: it
        # also joins the exchange bindings kombu stores in Redis, and a redelivery looks the
        # message's queue up in them; on a Redis holding bindings of the default one, sep ":"
        # made that lookup raise (ValueError; kombu 5.7), and kombu dropped the message: a job
        # whose worker died would be lost. The queue order strategy stays round robin: it only
        # orders queues of the same priority (a worker on both "audio" and "webhooks" takes
        # them in turn, as before)
        "priority_steps": list(PRIORITY_STEPS),
        # kombu gives its connections no socket timeout (its Transport passes None over redis-py's
        # own), so a publish on a connection whose Redis went away without closing it (a failover
        # to another address, a NAT or firewall that dropped the flow, a host lost) waited for
        # good: a worker publishing its job's webhook delivery then never took another job, while
        # its heartbeat (another thread, the job store's connections) told /health it was there.
        # Timed out, the publish is retried on a new connection (task_publish_retry)
        "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.queue_name,
        task_routes={WEBHOOK_TASK: {"queue": settings.webhook_queue_name}},
        # ack after the job ran, and requeue when the worker process dies mid-job
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # one job at a time per GPU, and no job reserved behind a running one
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        task_track_started=True,
        result_expires=settings.result_expires_s,
        result_extended=True,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        # the result backend's client (120 s and no connect timeout by default), as the broker's
        redis_socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        redis_socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        broker_connection_retry_on_startup=True,
        # Flower builds its task views from events
        worker_send_task_events=True,
        task_send_sent_event=True,
        # a model-loaded worker process is expensive: never recycle it between jobs
        worker_max_tasks_per_child=None,
        # a replacement pool process (after a crash) loads the models before it reports up;
        # Celery's 4 s default would kill it over and over
        worker_proc_alive_timeout=settings.worker_boot_timeout_s,
    )
    return app


def send_job(celery: Celery, kind: JobKind, job_id: str, queue: str, level: int = 0) -> None:
    """Enqueue a job. Only its id travels: parameters, file names and webhook URLs stay in the
    job record, out of the broker, the result backend and Flower.

    ``level`` (fair_priority; 0 is served first) picks the queue's list the message waits in
    (kombu's priority ``PRIORITY_STEPS[level]``); a job going back to the queue (handed back,
    or its worker lost) is sent at 0: it already waited its turn."""
    celery.send_task(kind.task_name, args=(job_id,), task_id=job_id, queue=queue, priority=PRIORITY_STEPS[level])


def level_thresholds(levels: int) -> list[int]:
    """How many of its tenant's jobs must be waiting for a new job to get level 1, 2, ...
    (1, 2, 4, ...): the levels ``fair_priority`` climbs, one per doubling of a backlog. The
    job store's submit script (shared/jobs.py) reads the same list, so one function decides."""
    return [1 << i for i in range(levels - 1)]


def fair_priority(waiting: int, levels: int = len(PRIORITY_STEPS)) -> int:
    """The level of a new job whose tenant has ``waiting`` jobs queued before it: 0 for none,
    1 for one, 2 for 2-3, 3 for 4 or more (with kombu's four steps). A log scale so that a
    tenant with one job waiting is barely behind an idle one, while a backlog of a thousand is
    behind both; another tenant's first job (level 0) overtakes all of the backlog but its first
    job."""
    return sum(1 for threshold in level_thresholds(levels) if waiting >= threshold)


def queue_keys(queue: str) -> list[str]:
    """The Redis lists a queue's messages wait in, one per priority step, priority 0 (the
    queue's own name) first: what a queue's length must add up (/metrics, KEDA), as kombu's
    ``Channel._size`` does. Named by kombu's own rule (``Channel._q_for_pri``)."""
    sep = RedisChannel.sep
    return [queue if step == 0 else f"{queue}{sep}{step}" for step in PRIORITY_STEPS]


def send_webhook(celery: Celery, job_id: str, settings: Settings) -> None:
    celery.send_task(WEBHOOK_TASK, args=(job_id,), queue=settings.webhook_queue_name)


def queue_depth(client: Any, queue: str) -> int:
    """Messages waiting in ``queue``, all its priority lists together (one round trip)."""
    with client.pipeline(transaction=False) as pipe:
        for key in queue_keys(queue):
            pipe.llen(key)
        return sum(int(n) for n in pipe.execute())
