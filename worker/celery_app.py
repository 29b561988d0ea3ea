"""The Celery application: Redis broker and result backend, settings from shared.settings.

Start a worker pinned to one GPU with::

    CUDA_VISIBLE_DEVICES=0 celery -A worker.celery_app worker -Q audio --concurrency 1 -n gpu0@%h

and one for webhook deliveries (no models)::

    AUDIO_ANALYSIS_WORKER_LOAD_MODELS=false celery -A worker.celery_app worker -Q webhooks -c 4 -n hooks@%h
"""

from __future__ import annotations

from celery import Celery

from shared.settings import Settings, get_settings


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("audio_analysis", broker=settings.redis_url, backend=settings.redis_url, include=["worker.tasks"])
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
        task_routes={"audio.deliver_webhook": {"queue": settings.webhook_queue_name}},
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


app = make_celery()

# make `celery -A worker.celery_app` find the signal handlers
import worker.lifecycle  # noqa: E402,F401
