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

from typing import Sequence

from celery import Celery

from shared.kinds import JobKind
from shared.settings import Settings, get_settings

WEBHOOK_TASK = "audio.deliver_webhook"


def make_celery(settings: Settings | None = None, *, include: Sequence[str] = ()) -> Celery:
    settings = settings or get_settings()
    app = Celery("audio_analysis", broker=settings.redis_url, backend=settings.redis_url, include=list(include))
    transport = {
        # an unacked job is redelivered only after this; it must exceed the longest job or a
        # running hour-long diarization would be handed to a second worker
        "visibility_timeout": settings.visibility_timeout_s,
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


def send_job(celery: Celery, kind: JobKind, job_id: str, queue: str) -> None:
    """Enqueue a job. Only its id travels: parameters, file names and webhook URLs stay in the
    job record, out of the broker, the result backend and Flower."""
    celery.send_task(kind.task_name, args=(job_id,), task_id=job_id, queue=queue)


def send_webhook(celery: Celery, job_id: str, settings: Settings) -> None:
    celery.send_task(WEBHOOK_TASK, args=(job_id,), queue=settings.webhook_queue_name)
