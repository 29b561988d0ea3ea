"""Round 17 of the hostile look at the job life cycle: real Redis, real Celery worker processes
(the production ``celery -A worker.celery_app worker`` command line), real HTTP receivers.

* a webhook worker run as prefork with ``--concurrency auto`` (Celery 5.7 sizes it from the CPUs)
  had no per-tenant cap at all: the cap's default (half the worker's processes) was read at
  ``worker_init``, where ``auto`` is not yet a number, and again at ``worker_ready``, after the
  pool processes, which deliver, were forked. One tenant's hanging receivers held every process.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tests.conftest import drop_namespace
from tests.test_webhook_fairness import _Receivers

PREFIX = "aa-r17-life"
HOOKS = "webhooks-r17-life"


def _wait(predicate, timeout_s: float, what: Any, step: float = 0.1) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, what() if callable(what) else what
        time.sleep(step)
    return time.monotonic() - started


def test_a_prefork_webhook_worker_of_concurrency_auto_caps_a_tenant(service_env, settings, tmp_path_factory):
    """``celery worker -P prefork --concurrency auto -Q webhooks``: ``auto`` resolves to the CPUs
    (2 here), so the default cap is 1. One tenant's four deliveries to receivers that never answer
    must hold one pool process, not all of them (before: both processes, ``most_waiting`` 2), and
    all four are made, each at attempt 1, once the receivers answer."""
    import pytest
    from celery.utils.sysinfo import cpu_budget

    from cli.launcher import Stack
    from shared.jobs import CANCELLED, JobRecord, JobStore, new_job_id
    from shared.queue import WEBHOOK_TASK, make_celery, queue_keys

    processes = cpu_budget(use_cgroup_quota=True).count
    if processes < 2:
        pytest.skip("auto resolves to 1 process here: the cap and no cap both allow 1")
    cap = max(1, processes // 2)
    mine = settings.model_copy(update={"redis_key_prefix": PREFIX, "webhook_queue_name": HOOKS})
    store = JobStore.from_settings(mine)
    receivers = _Receivers()
    stack = Stack(log_dir=tmp_path_factory.mktemp("r17-auto"))
    celery = make_celery(mine)
    try:
        stack.spawn("r17auto", [
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "prefork",
            "--concurrency", "auto", "-Q", HOOKS, "-n", "r17auto@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle"], env={
            "AUDIO_ANALYSIS_REDIS_KEY_PREFIX": PREFIX, "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": HOOKS,
            "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false", "AUDIO_ANALYSIS_WEBHOOK_DEADLINE_S": "20",
            "AUDIO_ANALYSIS_WEBHOOK_TIMEOUT_S": "20"})
        log = lambda: (stack.log_dir / "r17auto.log").read_text(errors="replace")[-4000:]  # noqa: E731
        assert stack.wait_for_queues(mine, [HOOKS], 90), log()
        hanging = []
        for n in range(processes * 2):
            job_id = new_job_id()
            store.create_queued(JobRecord(job_id=job_id, kind="embedding", status="queued", owner="tenant-a",
                                          webhook_url=receivers.url(f"/hang/{n}")))
            store.confirm_queued([job_id])
            store.finish(job_id, CANCELLED, notify=True)
            celery.send_task(WEBHOOK_TASK, args=(job_id,), queue=HOOKS)
            hanging.append(job_id)
        _wait(lambda: receivers.waiting >= 1, 30, log)
        time.sleep(3.0)  # every process has taken a delivery (and, capped, deferred it)
        assert receivers.most_waiting == cap, (receivers.most_waiting, cap, log())
        receivers.release.set()
        _wait(lambda: all(store.get(j).webhook.status == "delivered" for j in hanging), 60,
              lambda: ([store.get(j).webhook for j in hanging], log()))
        assert all(store.get(j).webhook.attempts == 1 for j in hanging)
    finally:
        receivers.close()
        stack.stop()
        celery.close()
        drop_namespace(settings.redis_url, PREFIX, *queue_keys(HOOKS))
