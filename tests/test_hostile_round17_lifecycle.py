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


def test_two_workers_of_one_name_at_one_pid_keep_a_heartbeat_each(service_env, settings, tmp_path_factory):
    """Two workers of one node name in containers that share a hostname (host networking: Docker's
    ``network_mode: host``, Kubernetes' ``hostNetwork``), each in a PID namespace of its own where
    the worker is PID 1 (``unshare --pid``, the hostname shared). Their heartbeat records were one
    (``<node>:1``): /health listed one worker of the two, and the warm stop of either deleted the
    record the other still heartbeat into. Each must have its own, and keep it when the other
    stops."""
    import os
    import shutil
    import socket

    import pytest

    from cli.launcher import Stack
    from shared.jobs import JobStore
    from shared.lifeline import PARENT_ENV
    from shared.queue import queue_keys

    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs unshare(1) and root to make a PID namespace")
    queues = ["audio-r17-dup-a", "audio-r17-dup-b"]
    store = JobStore.from_settings(settings.model_copy(update={"redis_key_prefix": PREFIX}))
    stacks = [Stack(log_dir=tmp_path_factory.mktemp(f"r17-dup-{n}")) for n in range(2)]
    node = f"r17dup@{socket.gethostname()}"

    def spawn(stack: Any, queue: str) -> Any:
        # --kill-child=SIGTERM: the stop of unshare is the worker's warm shutdown, as docker stop's
        return stack.spawn("r17dup", [
            unshare, "--pid", "--fork", "--kill-child=SIGTERM", "--mount-proc",
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "threads",
            "--concurrency", "1", "-Q", queue, "-n", "r17dup@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle"], env={
            "AUDIO_ANALYSIS_REDIS_KEY_PREFIX": PREFIX, "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false",
            "AUDIO_ANALYSIS_QUEUE_NAME": queue, "PYTHONPATH": os.getcwd(),
            # its parent is outside its namespace (getppid() is 0 there): no lifeline to follow
            PARENT_ENV: ""})

    def listed() -> list[dict[str, Any]]:
        return [w for w in store.workers() if w["worker"].startswith(node)]

    def logs() -> str:
        return "\n---\n".join((s.log_dir / "r17dup.log").read_text(errors="replace")[-2000:] for s in stacks)

    try:
        procs = [spawn(stack, queue) for stack, queue in zip(stacks, queues)]
        # both heartbeat, each from PID 1 of its namespace
        _wait(lambda: {q for w in listed() for q in w["queues"]} == set(queues)
              or any(p.poll() is not None for p in procs), 60, lambda: (listed(), logs()))
        assert all(p.poll() is None for p in procs), logs()
        time.sleep(3)  # a few heartbeats (1 s) of both
        workers = listed()
        assert len(workers) == 2 and {w["pid"] for w in workers} == {1}, (workers, logs())
        # one stops; the other's record stays, through heartbeats of its own
        stacks[1].stop()
        time.sleep(3)
        workers = listed()
        assert [w["queues"] for w in workers] == [[queues[0]]], (workers, logs())
    finally:
        for stack in stacks:
            stack.stop()
        drop_namespace(settings.redis_url, PREFIX, *(key for q in queues for key in queue_keys(q)))
