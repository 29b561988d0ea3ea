"""Round 17 of the hostile look at the job life cycle: real Redis, real Celery worker processes
(the production ``celery -A worker.celery_app worker`` command line), real HTTP receivers.

* a webhook worker run as prefork with ``--concurrency auto`` (Celery 5.7 sizes it from the CPUs)
  had no per-tenant cap at all: the cap's default (half the worker's processes) was read at
  ``worker_init``, where ``auto`` is not yet a number, and again at ``worker_ready``, after the
  pool processes, which deliver, were forked. One tenant's hanging receivers held every process;
* two workers of one node name at one PID in PID namespaces of their own (containers sharing a
  hostname) wrote one heartbeat record: /health listed one, and the stop of either removed it;
* ``audio-analysis up`` stopped everything, the API included, the first time one of its workers
  exited (the OOM killer; a worker ending itself with status 1 after its pool processes died
  loading the models, so that compose or k8s start it again): it now starts the worker again;
* a tenant with many deliveries over its cap (its receivers hang): each deferred delivery came
  back every second, 1,000 of them 1,000 times a second, more than the worker could take, and
  every other tenant's delivery waited in line behind them (the cap's promise undone by scale);
* a worker whose storage refuses writes (a volume read-only) failed a ``file_url`` job as an
  "internal error" (500), for good, where the API answers an upload so refused 503; so did one
  whose S3 bucket was out of reach when it took an uploaded job;
* ``audio-analysis submit --wait`` printed the job's id nowhere until the job ended: a Ctrl-C (or
  an API gone past the retries) left a job running that its submitter could not follow or cancel.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from typing import Any

import psutil

from tests.conftest import drop_namespace
from tests.conftest import wait_until as _wait
from tests.test_webhook_fairness import _Receivers

PREFIX = "aa-r17-life"
HOOKS = "webhooks-r17-life"


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

    def stop(stack: Any) -> None:
        # as docker stop does, SIGTERM to PID 1 of the namespace, the worker: unshare --fork
        # blocks SIGTERM while it waits for its child, and Stack.stop's SIGTERM to it reached the
        # worker only through --kill-child once the stop's 20 s were up and unshare was killed
        for child in stack.children:
            with contextlib.suppress(psutil.NoSuchProcess):
                for inner in psutil.Process(child.proc.pid).children():
                    inner.send_signal(signal.SIGTERM)
        stack.stop()

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
        stop(stacks[1])
        time.sleep(3)
        workers = listed()
        assert [w["queues"] for w in workers] == [[queues[0]]], (workers, logs())
    finally:
        for stack in stacks:
            stop(stack)
        drop_namespace(settings.redis_url, PREFIX, *(key for q in queues for key in queue_keys(q)))


def test_up_starts_a_worker_again_that_died_and_keeps_serving(tmp_path, utterances):
    """``audio-analysis up``, its job worker's main process killed (SIGKILL: the OOM killer). Before,
    ``up`` said "worker exited with -9; stopping" and stopped the API, the webhook worker and Redis
    with it: every client lost the service. Now the API answers on, the worker is started again
    (after a second's back-off), and a job submitted after the kill succeeds; Ctrl-C still stops
    everything with status 0."""
    import httpx
    import psutil

    from cli.launcher import free_port
    from tests.test_service_cli import _ctrl_c, _start_up, _up_env

    api_port = free_port()
    env = _up_env(tmp_path, api_port, free_port(), free_port())
    base = f"http://127.0.0.1:{api_port}"
    log_path = tmp_path / "up.log"
    up = _start_up(env, base, log_path, "--no-flower")
    log = lambda: log_path.read_text(errors="replace")[-3000:]  # noqa: E731

    def job_worker() -> psutil.Process | None:
        for child in psutil.Process(up.pid).children():
            argv = child.cmdline()
            if "-n" in argv and argv[argv.index("-n") + 1] == "worker@%h":
                return child
        return None

    try:
        first = job_worker()
        assert first is not None, log()
        first.kill()
        first.wait(10)
        # the API and `up` stay; the worker comes back as a new process
        _wait(lambda: (w := job_worker()) is not None and w.pid != first.pid, 30, log)
        assert up.poll() is None, log()
        assert httpx.get(f"{base}/health", timeout=5).status_code in (200, 503)
        r = httpx.post(f"{base}/jobs/embedding", timeout=30, files={
            "file": ("a.wav", utterances["spk1"][0].read_bytes(), "audio/wav")})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        _wait(lambda: httpx.get(f"{base}/jobs/{job_id}", timeout=5).json()["status"] in ("succeeded", "failed"),
              180, log)
        assert httpx.get(f"{base}/jobs/{job_id}", timeout=5).json()["status"] == "succeeded", log()
        said = log_path.read_text(errors="replace")
        assert "worker exited with -9" in said and "starting it again" in said and "; stopping" not in said, log()
    finally:
        _ctrl_c(up)
    assert up.returncode == 0, log()


def test_up_gives_up_on_a_child_that_keeps_exiting_at_once(tmp_path):
    """The other side of starting a worker again: one that exits at once, every time (a bad
    setting, an import that fails), is broken, not unlucky. ``up``'s watch starts it again after
    1, 2, 4 and 8 s, then stops with the fifth exit, as before the restarts (a script sees exit
    status 1), having started it five times; Redis exiting stops it at once, never restarted."""
    from cli import launcher

    stack = launcher.Stack(log_dir=tmp_path)
    said: list[str] = []
    try:
        stack.spawn("worker", [sys.executable, "-c", "print('started', flush=True); raise SystemExit(3)"])
        started = time.monotonic()
        while stack.watch(said.append):
            assert time.monotonic() - started < 60, said
            time.sleep(0.1)
        assert (tmp_path / "worker.log").read_text().count("started") == launcher.RESTART_GIVE_UP, said
        assert said[-1] == "worker exited with 3, 5 times in a row within 60 s of its start; stopping", said
        assert [line.rsplit(" in ", 1)[1] for line in said[:-1]] == ["1 s", "2 s", "4 s", "8 s"], said
        stack.stop()
        said.clear()
        stack.spawn("redis", [sys.executable, "-c", "raise SystemExit(0)"])
        stack.children[-1].proc.wait(10)
        assert not stack.watch(said.append) and said == ["redis exited with 0; stopping"], said
    finally:
        stack.stop()


def test_a_tenants_hundreds_of_deferred_deliveries_leave_another_tenants_prompt(service_env, settings, tmp_path_factory):
    """A webhook worker of 2 threads (cap 1 a tenant), tenant A's 400 finished jobs owed to
    receivers that take the connection and never answer (an endpoint in an outage), then tenant
    B's one delivery. Each of A's deferred deliveries came back every 0.5-1 s: the worker ran
    about 1,300 deferrals a second's worth of messages, far more than it could, and B's message
    waited behind them (measured: 28.8 s behind 2,000, 2.7 s behind 400, 0.1 s behind 10). Now A's
    deferred deliveries wait longer the more of them there are; B's must arrive within 1.5 s, and
    none of A's is dropped or counted as an attempt but the one holding A's slot. (1,000 of A's
    took 38 s to be deferred once each, which the test waits for; 400 show the same.)"""
    from cli.launcher import Stack
    from shared.jobs import CANCELLED, JobRecord, JobStore, new_job_id
    from shared.queue import WEBHOOK_TASK, make_celery, queue_keys

    N = 400
    mine = settings.model_copy(update={"redis_key_prefix": PREFIX, "webhook_queue_name": HOOKS})
    store = JobStore.from_settings(mine)
    receivers = _Receivers()
    stack = Stack(log_dir=tmp_path_factory.mktemp("r17-defer"))
    celery = make_celery(mine)

    def owed(owner: str, path: str) -> str:
        job_id = new_job_id()
        store.create_queued(JobRecord(job_id=job_id, kind="embedding", status="queued", owner=owner,
                                      webhook_url=receivers.url(path)))
        store.confirm_queued([job_id])
        store.finish(job_id, CANCELLED, notify=True)
        celery.send_task(WEBHOOK_TASK, args=(job_id,), queue=HOOKS)
        return job_id

    try:
        stack.start_worker(queues=[HOOKS], name="r17defer", pool="threads", concurrency=2, env={
            "AUDIO_ANALYSIS_REDIS_KEY_PREFIX": PREFIX, "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": HOOKS,
            "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false", "AUDIO_ANALYSIS_WEBHOOK_DEADLINE_S": "60",
            "AUDIO_ANALYSIS_WEBHOOK_TIMEOUT_S": "60"})
        log = lambda: (stack.log_dir / "r17defer.log").read_text(errors="replace")[-3000:]  # noqa: E731
        assert stack.wait_for_queues(mine, [HOOKS], 90), log()
        hanging = [owed("tenant-a", f"/hang/{n}") for n in range(N)]
        due_key = store.key("webhooks", "due")
        owed_at = store.redis.zmscore(due_key, hanging)
        _wait(lambda: receivers.waiting >= 1, 30, log)
        # every one of A's deliveries has been taken and deferred once (a deferral pushes its due
        # time on): B's message does not queue behind A's first looks, only behind their next ones
        _wait(lambda: sum(a != b for a, b in zip(owed_at, store.redis.zmscore(due_key, hanging))) >= N - 1,
              120, log)
        sent = time.monotonic()
        owed("tenant-b", "/prompt")
        took = _wait(lambda: receivers.for_path("/prompt"), 60, "B's delivery never arrived")
        print(f"\nB's delivery arrived {took:.2f} s after it was sent, behind {N} deferred deliveries of A")
        assert took < 1.5, took
        # A holds its one slot, and every other delivery of A's is still owed, at no attempt
        assert receivers.most_waiting == 1
        records = store.get_many(hanging)
        # a receiver answers after 60 s (_Receivers.release.wait), and the worker gives up on it
        # after 60 s (the webhook timeout): on a loaded machine the one holding A's slot may have
        # ended by now, delivered or timed out and to be retried, at one attempt, and the next
        # taken its slot. None of the others was counted as an attempt
        attempted = [r.webhook for r in records if r.webhook.attempts]
        assert len(attempted) <= 2 and all(w.attempts == 1 for w in attempted), attempted
        owed_still = [j for j, r in zip(hanging, records) if r.webhook.status != "delivered"]
        assert all(store.webhook_due_at(j) is not None for j in owed_still)
    finally:
        receivers.close()
        stack.stop()
        celery.close()
        drop_namespace(settings.redis_url, PREFIX, *queue_keys(HOOKS))


def test_a_worker_whose_storage_is_read_only_fails_a_fetched_job_as_the_services_state(
        service_env, settings, media_server, utterances, tmp_path_factory):
    """A job worker whose storage volume is mounted read-only (its own mount namespace here:
    ``unshare --mount``, a read-only bind mount of the storage folder) takes a ``file_url`` job:
    the fetch cannot write the file. The job failed at once, "internal error while processing the
    job" with status 500: a bug for the client, and a job lost for the service's state. It now goes
    back to the queue as a lost attempt (another worker may have its storage) and, past
    ``job_max_attempts``, fails 503 saying why and to submit it again."""
    import os
    import shutil

    import pytest
    from fastapi.testclient import TestClient

    from api.main import create_app
    from cli.launcher import Stack
    from shared.jobs import JobStore
    from shared.queue import queue_keys

    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs unshare(1) and root to mount a folder read-only")
    queue = "audio-r17-ro"
    storage = tmp_path_factory.mktemp("r17-ro-storage")
    mine = settings.model_copy(update={"redis_key_prefix": PREFIX, "queue_name": queue, "storage_dir": storage})
    store = JobStore.from_settings(mine)
    stack = Stack(log_dir=tmp_path_factory.mktemp("r17-ro"))
    url = media_server.file("/r17/ro.wav", utterances["spk1"][0].read_bytes(), content_type="audio/wav")
    worker = " ".join([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "prefork",
                       "--concurrency", "1", "-Q", queue, "-n", "r17ro@%h", "--loglevel", "INFO",
                       "--without-gossip", "--without-mingle"])
    try:
        stack.spawn("r17ro", [unshare, "--mount", "sh", "-c",
                              f'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec {worker}', str(storage)],
                    env={"AUDIO_ANALYSIS_REDIS_KEY_PREFIX": PREFIX, "AUDIO_ANALYSIS_QUEUE_NAME": queue,
                         "AUDIO_ANALYSIS_STORAGE_DIR": str(storage), "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false",
                         "PYTHONPATH": os.getcwd()})
        log = lambda: (stack.log_dir / "r17ro.log").read_text(errors="replace")[-3000:]  # noqa: E731
        assert stack.wait_for_queues(mine, [queue], 90), log()
        with TestClient(create_app(mine), raise_server_exceptions=False) as api:
            r = api.post("/jobs/embedding", data={"file_url": url})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            _wait(lambda: api.get(f"/jobs/{job_id}").json()["status"] in ("succeeded", "failed"), 90, log)
            record = api.get(f"/jobs/{job_id}").json()
        assert record["status"] == "failed", record
        error = record["error"]
        assert error["status_code"] == 503, (error, log())
        assert "storage refused" in error["detail"] and "submit it again" in error["detail"], error
        assert record["attempts"] == settings.job_max_attempts, record
    finally:
        stack.stop()
        drop_namespace(settings.redis_url, PREFIX, *queue_keys(queue))


def test_a_worker_whose_bucket_is_out_of_reach_fails_the_job_as_the_services_state(
        service_env, settings, utterances, tmp_path_factory):
    """The S3 backend (moto's server on 127.0.0.1): a job uploaded into the bucket, then the
    bucket out of reach (the server stopped: an outage, a network partition) when a worker takes
    the job. The worker's look for the upload raised botocore's EndpointConnectionError once
    boto3's retries ran out, and the job failed for good as an "internal error" (500). It now goes
    back to the queue as a lost attempt and, past ``job_max_attempts``, fails 503 saying so."""
    import os

    import boto3
    from fastapi.testclient import TestClient
    from moto.server import ThreadedMotoServer

    from api.main import create_app
    from cli.launcher import Stack, free_port
    from shared.jobs import JobStore
    from shared.queue import queue_keys

    queue, bucket, port = "audio-r17-s3", "r17-bucket", free_port()
    aws = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in aws}
    os.environ.update(aws)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    s3 = {"storage_backend": "s3", "s3_bucket": bucket, "s3_endpoint_url": url, "s3_region": "us-east-1",
          "s3_addressing_style": "path", "storage_dir": tmp_path_factory.mktemp("r17-s3-tmp")}
    mine = settings.model_copy(update={"redis_key_prefix": PREFIX, "queue_name": queue, **s3})
    store = JobStore.from_settings(mine)
    stack = Stack(log_dir=tmp_path_factory.mktemp("r17-s3"))
    try:
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=bucket)
        with TestClient(create_app(mine), raise_server_exceptions=False) as api:
            r = api.post("/jobs/embedding", files={"file": ("a.wav", utterances["spk1"][0].read_bytes(), "audio/wav")})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            server.stop()  # the bucket is out of reach from here on
            stack.start_worker(queues=[queue], name="r17s3", pool="prefork", env={
                **aws, "AUDIO_ANALYSIS_REDIS_KEY_PREFIX": PREFIX, "AUDIO_ANALYSIS_QUEUE_NAME": queue,
                "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false",
                **{f"AUDIO_ANALYSIS_{k.upper()}": str(v) for k, v in s3.items()}})
            log = lambda: (stack.log_dir / "r17s3.log").read_text(errors="replace")[-3000:]  # noqa: E731
            _wait(lambda: store.get(job_id).status == "failed", 180, log)
            record = api.get(f"/jobs/{job_id}").json()
        error = record["error"]
        assert error["status_code"] == 503, (error, log())
        assert "bucket out of reach" in error["detail"] and "submit it again" in error["detail"], error
        assert record["attempts"] == settings.job_max_attempts, record
    finally:
        stack.stop()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        drop_namespace(settings.redis_url, PREFIX, *queue_keys(queue))


def test_submit_wait_says_the_jobs_id_before_it_waits_and_when_it_stops(service_env, settings, utterances,
                                                                         tmp_path_factory):
    """``audio-analysis submit FILE --wait`` against the API (uvicorn), its job queued where no
    worker takes it, then Ctrl-C (SIGINT) during the wait. Before: "Aborted!", exit 1, and the
    job's id nowhere: the job went on, queued or running, and its submitter could neither follow,
    fetch nor cancel it. Now stderr names the job before the wait and again, with the commands
    that follow, fetch and cancel it, when the wait stops (exit 130, a Ctrl-C's)."""
    import os
    import subprocess

    from cli.launcher import Stack, free_port
    from shared.jobs import JobStore
    from shared.queue import queue_keys

    queue = "audio-r17-nobody"
    env = {**os.environ, **{k: v for k, v in service_env.items() if not k.startswith("_")},
           "AUDIO_ANALYSIS_REDIS_KEY_PREFIX": PREFIX, "AUDIO_ANALYSIS_QUEUE_NAME": queue}
    store = JobStore.from_settings(settings.model_copy(update={"redis_key_prefix": PREFIX, "queue_name": queue}))
    stack = Stack(env=env, log_dir=tmp_path_factory.mktemp("r17-wait"))
    port = free_port()
    err_path = stack.log_dir / "cli.err"
    try:
        stack.start_api("127.0.0.1", port)
        with open(err_path, "wb") as err:
            cli = subprocess.Popen([sys.executable, "-m", "cli.main", "submit", str(utterances["spk1"][0]), "--wait",
                                    "--kind", "embedding", "--url", f"http://127.0.0.1:{port}"],
                                   env=env, stdout=subprocess.PIPE, stderr=err)
            try:
                _wait(lambda: store.redis.keys(f"{PREFIX}:job:*") or cli.poll() is not None, 60,
                      lambda: err_path.read_text(errors="replace"))
                assert cli.poll() is None, err_path.read_text(errors="replace")
                [job_id] = [r.job_id for r in store.recent(5)]
                time.sleep(1.0)  # polling now
                cli.send_signal(signal.SIGINT)
                cli.wait(30)
            finally:
                if cli.poll() is None:
                    cli.kill()
        said = err_path.read_text(errors="replace")
        assert cli.returncode == 130, (cli.returncode, said)
        assert f"job {job_id} queued" in said and f"audio-analysis cancel {job_id}" in said, said
        assert store.get(job_id).status == "queued"  # the job goes on
    finally:
        stack.stop()
        drop_namespace(settings.redis_url, PREFIX, *queue_keys(queue))
