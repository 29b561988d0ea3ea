"""Round 16 of the hostile look at the job life cycle: real Redis, real Celery worker processes
(the production ``celery -A worker.celery_app worker`` command line), the API in process.

* a prefork worker's main process frozen (SIGSTOP: a paused VM, a host deep in swap) while its
  BRPOP waits in Redis: the next message pushed to its queue is handed to the frozen process's
  socket, in no list and in no worker's unacked set. Only ``recover_unqueued_jobs`` could send it
  again, and it looked at a job only once queued ``job_unqueued_after_s`` (300 s) plus two passes:
  six minutes of a lost job, while the frozen worker's own pool process knew within seconds
  (``main_stall_s``) that its main process had stopped. That pool process now says so in Redis,
  and every worker's pass then looks at every confirmed queued job, whatever its age, until the
  usual look covers what the stall could have taken;
* the same of a worker frozen whole (a solo worker stopped; ``docker pause``, a VM paused: the
  pool processes stop too, so nothing of that worker can say so), or lost with its host while its
  BRPOP waited (Redis hands the message to a connection it does not yet know is dead): the
  heartbeat index's pruning, which every worker's pass now runs, takes a worker whose heartbeat
  lapsed without its stopping (a clean stop removes its name) for one that may hold a message, and
  says so as above.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from tests.conftest import drop_namespace, wait_for_job
from tests.conftest import wait_until as _wait

PREFIX = "aa-r16-frozen"
QUEUE, OTHER, HOOKS = "audio-r16-frozen", "audio-r16-other", "webhooks-r16-frozen"
WORKER_ENV = {
    "AUDIO_ANALYSIS_REDIS_KEY_PREFIX": PREFIX, "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": HOOKS,
    "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false", "AUDIO_ANALYSIS_JOB_LEASE_S": "2",
    "AUDIO_ANALYSIS_JOB_RECOVERY_INTERVAL_S": "1",
}


def _ids(store: Any, queue: str) -> list[str]:
    from shared.queue import queue_keys

    return sorted(json.loads(raw)["headers"]["id"]
                  for key in queue_keys(queue) for raw in store.redis.lrange(key, 0, -1))


def _unacked(store: Any) -> str:
    from worker.recovery import UNACKED

    return "\n".join(v.decode(errors="replace") if isinstance(v, bytes) else v
                     for v in store.redis.hvals(UNACKED))


def _lose_to_frozen(store: Any, api: Any, proc: Any, queue: str, media_server: Any, name: str) -> tuple[str, str]:
    """Stop ``proc`` (SIGSTOP) and submit a job to ``queue``, which only it consumes, at once,
    until the job's message is nowhere in Redis: taken by the stopped process's waiting BRPOP
    (else it was between two waits: it runs the job, and another try follows). Returns the job's
    id and the path of its URL (which answers 404), ``proc`` stopped."""
    for attempt in range(3):
        path = f"/r16/{name}-{attempt}.wav"
        url = media_server.file(path, b"gone", status=404)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.05)
        r = api.post("/jobs/embedding", data={"file_url": url})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        time.sleep(0.3)
        if job_id not in _ids(store, queue) and job_id not in _unacked(store):
            return job_id, path
        proc.send_signal(signal.SIGCONT)
        wait_for_job(api, job_id, timeout_s=60)
        time.sleep(1.5)
    raise AssertionError("the stopped worker's BRPOP never took a message")


def test_a_message_a_frozen_worker_took_is_sent_again_within_a_minute(
        service_env, settings, media_server, tmp_path_factory):
    """Two workers without models, each alone on its queue: A1 (prefork), whose main process is
    stopped, and A2 (solo), stopped whole (as a paused container or VM, or a host lost); B, on a
    queue of its own, runs the recovery passes (every second; ``job_unqueued_after_s`` stays
    300 s). Each is stopped and a job submitted to its queue at once: the message leaves the list
    for the stopped process's socket (tried again should its BRPOP have been between two waits).
    One after the other, each message is back in its queue within 60 s (measured: 15 s for A1, the
    stall bound and two passes; 3.4 s for A2, its heartbeat's lapse and two passes); before, both
    stayed nowhere past the 60 s (300 s and two passes). After SIGCONT each job ran once: its URL, which answers 404,
    was asked once, and the job failed at attempt 1."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from cli.launcher import Stack
    from shared.jobs import JobStore
    from shared.queue import queue_keys

    queues = {"r16frozen": QUEUE, "r16solo": QUEUE + "-solo"}
    store = JobStore.from_settings(settings.model_copy(update={"redis_key_prefix": PREFIX}))
    stack = Stack(log_dir=tmp_path_factory.mktemp("r16-frozen"))
    frozen: list[Any] = []
    try:
        procs = {name: stack.start_worker(queues=[queue], name=name, pool="prefork" if name == "r16frozen" else "solo",
                                          env={**WORKER_ENV, "AUDIO_ANALYSIS_QUEUE_NAME": queue})
                 for name, queue in queues.items()}
        stack.start_worker(queues=[OTHER], name="r16other", env={**WORKER_ENV, "AUDIO_ANALYSIS_QUEUE_NAME": OTHER})

        def listed(name: str) -> bool:
            return any(w["worker"].startswith(f"{name}@") for w in store.workers())

        _wait(lambda: all(listed(name) for name in (*queues, "r16other")), 90,
              lambda: (stack.log_dir / "r16frozen.log").read_text(errors="replace")[-3000:])
        time.sleep(1.5)  # their consumers are in their BRPOP loops
        lost: dict[str, tuple[str, str]] = {}
        for name, queue in queues.items():
            mine = settings.model_copy(update={"redis_key_prefix": PREFIX, "queue_name": queue,
                                               "webhook_queue_name": HOOKS})
            with TestClient(create_app(mine), raise_server_exceptions=False) as api:
                frozen.append(procs[name])
                lost[name] = job_id, _ = _lose_to_frozen(store, api, procs[name], queue, media_server, name)
            took = _wait(lambda: job_id in _ids(store, queue), 60,
                         lambda: f"the message the stopped {name} took is still nowhere; {store.get(job_id)}")
            print(f"\nthe message {name} took stopped was sent again {took:.1f} s after its submission")
            assert store.get(job_id).status == "queued"
            # the next worker's case is its own: the mark the first one left (A1's stall, then its
            # heartbeat's lapse, once pruned) would send its message again as well
            _wait(lambda: not listed(name), 30, f"{name} is still listed")
            store.redis.delete(store.consumer_lost_key())
        for proc in frozen:
            proc.send_signal(signal.SIGCONT)
        frozen.clear()
        with TestClient(create_app(settings.model_copy(update={"redis_key_prefix": PREFIX})),
                        raise_server_exceptions=False) as api:
            for name, queue in queues.items():
                job_id, path = lost[name]
                record = wait_for_job(api, job_id, timeout_s=60)
                assert record["status"] == "failed" and record["attempts"] == 1, record
                assert "404" in record["error"]["detail"], record["error"]
                # the copy that was sent again and the stopped one: the job ran once
                _wait(lambda: job_id not in _ids(store, queue) and job_id not in _unacked(store), 30,
                      "a copy of the job's message stays in the broker")
                assert len(media_server.for_path(path)) == 1, media_server.for_path(path)
    finally:
        for proc in frozen:
            proc.send_signal(signal.SIGCONT)
        stack.stop()
        drop_namespace(settings.redis_url, PREFIX, *(k for q in (*queues.values(), OTHER, HOOKS) for k in queue_keys(q)))


# the holder: a lease taken in a process of its own PID namespace, its token printed, then held
_HOLDER = """
import sys, time
import redis
from worker.lease import JobLease
client = redis.Redis.from_url(sys.argv[1])
lease = JobLease(client, sys.argv[2], 30.0)
assert lease.acquire() is None
print(client.get(sys.argv[2]).decode(), flush=True)
time.sleep(120)
"""


def test_a_lease_held_in_another_pid_namespace_of_the_same_hostname_is_not_taken_over(settings, redis_client):
    """Two worker containers with one hostname (host networking: Docker's ``network_mode: host``,
    Kubernetes' ``hostNetwork``, each with its own PID namespace) on one machine. A job's lease
    held by a live worker in one was taken for a dead one's by the other: its holder's PID, looked
    up in the wrong namespace, did not exist, so the second copy of the job took the lease over
    and ran the job a second time, and the recovery pass queued the running job again. Here the
    holder runs in a PID namespace of its own (``unshare --pid``, the hostname shared), at a PID
    that does not exist in this one; this process's JobLease must find it alive, and so must the
    recovery pass's check."""
    import os
    import shutil
    import subprocess
    import sys
    import uuid

    from shared.jobs import JobStore
    from worker.lease import JobLease, holder_alive
    from worker.recovery import _lease_alive

    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        import pytest

        pytest.skip("needs unshare(1) and root to make a PID namespace")
    # a PID free here, which the holder gets in its own namespace
    pid = next(p for p in range(31000, 20000, -1) if not os.path.exists(f"/proc/{p}"))
    store = JobStore.from_settings(settings)
    job_id = uuid.uuid4().hex
    key = store.key("job", job_id, "lease")
    proc = subprocess.Popen(
        [unshare, "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c",
         f'echo {pid - 1} > /proc/sys/kernel/ns_last_pid; "$0" -c "$1" "$2" "$3" & wait',
         sys.executable, _HOLDER, settings.redis_url, key],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        token = proc.stdout.readline().strip()
        assert token, proc.stderr.read() if proc.poll() is not None else "no token"
        assert token.split("|")[1] == str(pid) and not os.path.exists(f"/proc/{pid}"), (token, pid)
        assert holder_alive(token), token
        assert _lease_alive(store, job_id)
        # a second copy of the job, here: it must wait for the holder, not take its lease
        second = JobLease(store.redis, key, 30.0)
        assert second.acquire() == token
        assert redis_client.get(key).decode() == token
    finally:
        proc.kill()  # unshare's SIGKILL: --kill-child ends its namespace with it
        proc.wait(timeout=10)
        redis_client.delete(key)


# a worker whose main process takes 3 s between its start and its pool's fork (its import of
# torch and the pipelines does, in production) and whose load raises after 2 s
_SLOW_LOAD_APP = '''
import time

from celery import signals

from engine.core import Engine
from worker.celery_app import app

__all__ = ["app"]


@signals.worker_init.connect
def _slow_start(**_):
    time.sleep(3)


def _raising_load(self, *args, **kwargs):
    time.sleep(2)
    raise RuntimeError("no weights here")


Engine.load_models = _raising_load
'''


def test_two_workers_of_one_name_leave_each_other_alone(service_env, settings, media_server, tmp_path_factory):
    """Two workers of one node name on one machine: ``celery worker`` started twice without
    ``-n`` (both ``celery@<host>``), or two pods of ``-n gpu@%h`` on one node with host networking.
    Both kept per node name what is each worker's own:

    * the count of its model loads that never ended (``worker_max_load_deaths``): started within
      the seconds their main processes take to import torch, each cleared the count, then counted
      the other's load as a death; with the limit at 1 here (3 by default: the fourth of
      same-named GPU pods of a node starting together) the second stopped with status 1, "died 1
      times in a row while loading the models", though no process died. Both start together here
      (and their loads raise: a load_error keeps a worker up); both must stay up;
    * the warm-shutdown mark: B's SIGTERM marked ``stopping:<node name>``, which A's pool process
      read too: its running job was handed back, and, the flag being for good in that process,
      every job it took after at its first progress report: a worker that bounced every job. Here
      A downloads a job's audio from a URL that trickles it; B (another queue) is stopped. A's job
      must still be running, at its first attempt, seconds after B is gone (before: attempt 53,
      3 s on); A's own SIGTERM then hands it back."""
    import socket
    import sys
    import threading

    from fastapi.testclient import TestClient

    from api.main import create_app
    from cli.launcher import Stack
    from shared.jobs import JobStore
    from shared.queue import queue_keys

    queue, other = QUEUE + "-dup", OTHER + "-dup"
    mine = settings.model_copy(update={"redis_key_prefix": PREFIX, "queue_name": queue, "webhook_queue_name": HOOKS})
    store = JobStore.from_settings(mine)
    stop_trickle = threading.Event()

    def trickle(handler: Any) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "audio/wav")
        handler.send_header("Content-Length", str(10_000_000))
        handler.end_headers()
        while not stop_trickle.is_set():
            handler.write(b"\0" * 512)
            time.sleep(0.1)

    url = media_server.route("/r16/trickle.wav", trickle)
    app_dir = tmp_path_factory.mktemp("r16-slow-load-app")
    (app_dir / "r16_slow_load_app.py").write_text(_SLOW_LOAD_APP)
    stacks = [Stack(log_dir=tmp_path_factory.mktemp("r16-dup-a")), Stack(log_dir=tmp_path_factory.mktemp("r16-dup-b"))]

    def spawn(stack: Any, on: str) -> Any:
        env = {**WORKER_ENV, "AUDIO_ANALYSIS_QUEUE_NAME": on, "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "true",
               "AUDIO_ANALYSIS_WORKER_MAX_LOAD_DEATHS": "1", "PYTHONPATH": f"{app_dir}:{os.getcwd()}"}
        return stack.spawn("r16dup", [
            sys.executable, "-m", "celery", "-A", "r16_slow_load_app", "worker", "--pool", "prefork",
            "--concurrency", "1", "-Q", on, "-n", "r16dup@%h", "--loglevel", "INFO", "--without-gossip",
            "--without-mingle"], env=env)

    def logs() -> str:
        return "\n---\n".join((s.log_dir / "r16dup.log").read_text(errors="replace")[-2000:] for s in stacks)

    try:
        a, b = spawn(stacks[0], queue), spawn(stacks[1], other)
        node = f"r16dup@{socket.gethostname()}"
        _wait(lambda: len([w for w in store.workers() if w["worker"].startswith(node) and w.get("load_error")]) >= 2
              or a.poll() is not None or b.poll() is not None, 120, logs)
        assert a.poll() is None and b.poll() is None, logs()
        assert "in a row while loading the models" not in logs(), logs()
        with TestClient(create_app(mine), raise_server_exceptions=False) as api:
            r = api.post("/jobs/embedding", data={"file_url": url})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]

            def downloading() -> bool:
                record = store.get(job_id)
                return record is not None and record.status == "running" and record.step is not None

            _wait(downloading, 60, lambda: store.get(job_id))
            b.send_signal(signal.SIGTERM)
            b.wait(timeout=60)
            time.sleep(2)  # A's job reports progress every chunk (0.1 s), checking the mark each second
            record = store.get(job_id)
            log = (stacks[0].log_dir / "r16dup.log").read_text(errors="replace")
            assert record.status == "running" and record.attempts == 1, (record, log[-3000:])
            assert "handed back" not in log, log[-3000:]
            # and A's own warm shutdown still reaches its pool process: the job goes back at once
            a.send_signal(signal.SIGTERM)
            _wait(lambda: store.get(job_id).status == "queued", 30,
                  lambda: (store.get(job_id), (stacks[0].log_dir / "r16dup.log").read_text(errors="replace")[-3000:]))
            assert store.get(job_id).attempts == 1
            assert api.post(f"/jobs/{job_id}/cancel").status_code == 200
    finally:
        stop_trickle.set()
        for stack in stacks:
            stack.stop()
        drop_namespace(settings.redis_url, PREFIX, *queue_keys(queue), *queue_keys(other), *queue_keys(HOOKS))


def test_a_delivery_taken_over_while_it_hung_leaves_the_delivered_state_alone(service_env, settings):
    """A delivery task whose worker stalled mid-POST (a SIGSTOP, a paused VM) past its due time:
    the recovery pass gave the delivery to a new task, which delivered it. The stalled task then
    came back, its POST failed (the receiver had closed the connection), and it wrote its failure
    over the record: ``webhook.status`` "retrying" (or "failed", were it its last attempt) with its
    ``last_error`` and its attempt count, for a webhook that was delivered, and for good. Here the
    takeover happens, for real (the delivery task's own code, run in this process), while the
    first attempt's POST waits on the receiver; the first attempt is then answered with a closed
    connection. The record must still say delivered, at attempt 2."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading
    import uuid

    import worker.tasks as tasks
    from shared.jobs import CANCELLED, JobRecord, JobStore, new_job_id

    store = JobStore.from_settings(settings)
    job_id = new_job_id()
    posts: list[str] = []

    class Receiver(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            posts.append(self.headers["X-AudioAnalysis-Attempt"])
            if len(posts) == 1:
                # the recovery pass's takeover (JobStore.take_over_webhook's claim), and the new
                # task's delivery, while this first attempt waits for its answer
                taker = uuid.uuid4().hex
                store.redis.set(store.key("webhook", job_id, "claim"), taker)
                tasks.deliver_webhook.apply(args=(job_id,), task_id=taker)
                self.close_connection = True
                return  # no answer: the first attempt fails
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        record = JobRecord(job_id=job_id, kind="embedding", status="queued",
                           webhook_url=f"http://127.0.0.1:{server.server_address[1]}/hook")
        store.create_queued(record)
        store.confirm_queued([job_id])
        store.finish(job_id, CANCELLED, notify=True)
        tasks.deliver_webhook.apply(args=(job_id,), task_id=uuid.uuid4().hex)
        assert posts == ["1", "2"], posts
        state = store.get(job_id).webhook
        assert state.status == "delivered" and state.attempts == 2 and state.last_error is None, state
        assert store.webhook_due_at(job_id) is None
    finally:
        server.shutdown()
        server.server_close()
