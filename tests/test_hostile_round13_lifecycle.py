"""Round 13 of the job life cycle under attack: real Celery worker processes (solo pool, as the
earlier rounds' rigs; no models where the job ends at its audio by URL), the session's Redis, the
API in process (TestClient), SIGKILL at chosen moments.

Each test fails on the code before its fix:

* a worker killed (SIGKILL, the OOM killer, a container's memory limit) while it held the
  retry of a job whose submission the API had not confirmed yet (an idle worker takes a message
  the moment it is sent; a batch's first jobs wait for its last file's message; the worker waits
  0.5 s, then holds the message as a Celery retry for up to 5 s) took the job's only message
  with it: unacked in Redis, where the broker hands it out again only after its visibility
  timeout (6 h). The job was confirmed (202) and stayed "queued" all that time; nothing looked
  for it, as the recovery pass looks only at running jobs. Such a hold now has a due time in
  Redis (``JobStore.hold_message``), and each worker's recovery pass sends the job's message
  again once it passed (worker/recovery.py ``recover_held_jobs``);
* a prefork worker whose pool processes kept dying as they loaded the models (the OOM killer:
  the models do not fit in the memory left; a crashing GPU driver) had each replacement announce
  its queues while loading, so the queue's consumers key never lapsed and synchronous calls were
  taken for a worker that could never run them (each waited the sync timeout, an hour, for a
  504) instead of the prompt 503 a worker whose load raised gets. A process that finds two of its
  worker's loads unfinished before its own now announces only once its load succeeded
  (worker/lifecycle.py). And the job such a worker's parent took from the queue (it consumes
  whatever its pool processes do) waited in its hands for a process that never became ready: the
  job stayed "queued" until the broker's visibility timeout (6 h), with a healthy worker beside
  it. The recovery pass now sends again the message of a queued job that a worker has held
  unstarted for two leases and a pass (worker/recovery.py ``recover_reserved_jobs``), which also
  covers a worker killed between taking a message and starting its job;
* a worker whose broker connection went silent (its Redis gone without closing it: a failover to
  another address, a NAT or firewall that dropped the flow) as it published a job's webhook
  delivery waited on it for good: kombu gives broker connections no socket timeout. It never took
  another job, while its heartbeat thread kept it on /health and the queue's consumers key alive.
  The broker, the result backend and the job store now time out after 10 s (shared/queue.py), and
  the publish is retried on a new connection.

Held, and pinned here: the job store's connections going silent mid-job (redis-py 8's 5 s default
timeout; the job store now sets its own).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from typing import Any, Iterator
from urllib.parse import urlsplit

from tests.conftest import wait_for_job
from tests.test_queued_records import _start_worker, _wait_for_log
from tests.test_service_redelivery import _ts

HELD_QUEUE = "audio-r13-held"
# no models (every job here ends at its audio by URL), 2 s leases and a recovery pass every second
NO_MODELS = {"AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false", "AUDIO_ANALYSIS_JOB_LEASE_S": "2",
             "AUDIO_ANALYSIS_JOB_RECOVERY_INTERVAL_S": "1"}


def _store(settings: Any):
    from shared.jobs import JobStore

    return JobStore.from_settings(settings)


@contextlib.contextmanager
def _api_with(settings: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def _api(settings: Any, queue: str) -> Any:
    return _api_with(settings.model_copy(update={"queue_name": queue}))


_worker = contextlib.contextmanager(_start_worker)


def _wait(predicate, timeout_s: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(step)


def _queue_keys(queue: str) -> list[str]:
    from shared.queue import queue_keys

    return queue_keys(queue)


def _queued_messages(store: Any, queue: str) -> int:
    return sum(store.redis.llen(key) for key in _queue_keys(queue))


def test_a_worker_killed_while_it_holds_an_unconfirmed_jobs_retry_leaves_the_job_to_run(
        service_env, settings, media_server, tmp_path_factory, monkeypatch):
    """The API sends the job's message and is slow to confirm it (a batch's first jobs wait for its
    last file's message); the idle worker takes the message, waits its 0.5 s for the confirmation
    and holds the message as a retry, and is SIGKILLed then. The API confirms: 202. Another worker
    starts: the job must run (here: fail at its URL's 404, attempt 1), not wait 6 h "queued" for
    the broker's visibility timeout."""
    import api.dispatch

    store = _store(settings)
    base = tmp_path_factory.mktemp("r13-held")
    env = {"AUDIO_ANALYSIS_QUEUE_NAME": HELD_QUEUE, **NO_MODELS}
    url = media_server.file("/r13/held.wav", b"gone", status=404)
    send = api.dispatch.send_job
    killed: list[float] = []
    try:
        with _api(settings, HELD_QUEUE) as client:
            with _worker(base, "r13held1", HELD_QUEUE, env) as first:
                def send_then_lose_the_worker(*args: Any, **kwargs: Any) -> None:
                    send(*args, **kwargs)
                    # the worker took the message, waited for the confirmation, and now holds it
                    # as a retry (back from the queue into the worker's hands)
                    _wait_for_log(first, "its submission is not confirmed yet", timeout_s=30)
                    _wait(lambda: _queued_messages(store, HELD_QUEUE) == 0, 10, "the retry was not taken back")
                    time.sleep(0.3)  # the consumer has it: received, acknowledged to nobody
                    first.proc.send_signal(signal.SIGKILL)
                    first.proc.wait(10)
                    killed.append(time.monotonic())

                monkeypatch.setattr(api.dispatch, "send_job", send_then_lose_the_worker)
                r = client.post("/jobs/embedding", data={"file_url": url})
                monkeypatch.setattr(api.dispatch, "send_job", send)
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            assert killed, "the worker was not killed"
            assert store.get(job_id).status == "queued"
            with _worker(base, "r13held2", HELD_QUEUE, env):
                done = wait_for_job(client, job_id, timeout_s=30)
            print(f"\njob ran {time.monotonic() - killed[0]:.1f} s after its worker was killed")
            # it ran, once: its audio's URL answered 404
            assert done["status"] == "failed" and done["attempts"] == 1, done
            assert done["error"]["status_code"] == 422 and "404" in done["error"]["detail"], done["error"]
    finally:
        store.redis.delete(*_queue_keys(HELD_QUEUE))


# --- a Redis gone without closing its connections ---------------------------------------------------

class SilencingProxy:
    """127.0.0.1:<port> -> Redis. ``silence(needle)``: each connection open now goes silent the next
    time its client sends ``needle``: that command and all that follows are swallowed, nothing comes
    back, and the socket stays open, as with a Redis gone without closing its connections (a failover
    to another address, a NAT or firewall that dropped the flow, a host lost). Connections opened
    afterwards are forwarded as before: the address reaches a Redis again."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self, needle: bytes) -> None:
        with self.lock:
            for conn in self.connections:
                conn["needle"] = needle

    @property
    def silenced(self) -> int:
        with self.lock:
            return sum(1 for conn in self.connections if conn["silent"])

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            conn = {"needle": None, "silent": False, "sockets": (client, upstream)}
            with self.lock:
                self.connections.append(conn)
            threading.Thread(target=self._pump, args=(client, upstream, conn, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, conn, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, conn: dict[str, Any], from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and not conn["silent"] and conn["needle"] and conn["needle"] in data:
                    conn["silent"] = True
                if not conn["silent"]:
                    target.sendall(data)
        except OSError:
            pass
        for s in (source, target):
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self.closed = True
        self.server.close()
        with self.lock:
            for conn in self.connections:
                for s in conn["sockets"]:
                    with contextlib.suppress(OSError):
                        s.close()


SILENT_QUEUE = "audio-r13-silent"


def test_a_redis_gone_silent_mid_job_does_not_hang_the_worker_for_good(
        service_env, settings, media_server, tmp_path_factory):
    """A worker reaches Redis through a proxy; mid-job (its audio downloading, a progress report
    every read) every connection of its job store goes silent, while new connections reach Redis.
    Held with the redis-py installed here (8.x gives every connection a 5 s socket timeout by
    default; the 5.x releases pyproject.toml allows gave none), and the job store now sets its own
    (shared/queue.py): the job's report, the lease's refresh and the heartbeat fail as an
    unreachable Redis does instead of waiting on their dead connections for good (the kernel's TCP
    retries give up after some 15 min on a lost route; through this proxy, never). The job goes
    back to the queue and runs again (here: its URL's second answer is a 404, attempt 2), and the
    worker heartbeats on new connections. A client built with ``socket_timeout=None`` fails this
    (checked: the job never ended)."""
    from shared.queue import REDIS_SOCKET_TIMEOUT_S, queue_keys

    store = _store(settings)
    # the service's own timeout, whatever the client library's default
    assert store.redis.connection_pool.connection_kwargs["socket_timeout"] == REDIS_SOCKET_TIMEOUT_S
    redis_port = urlsplit(settings.redis_url).port or 6379
    proxy = SilencingProxy(redis_port)
    via_proxy = f"redis://127.0.0.1:{proxy.port}/{urlsplit(settings.redis_url).path.strip('/') or 0}"
    env = {"AUDIO_ANALYSIS_QUEUE_NAME": SILENT_QUEUE, "REDIS_URL": via_proxy, "AUDIO_ANALYSIS_REDIS_URL": via_proxy,
           **NO_MODELS}
    served: list[int] = []

    def trickle_once(handler: Any) -> None:
        served.append(1)
        if len(served) > 1:
            handler.answer(404, b"gone", "text/plain")
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "audio/wav")
        handler.send_header("Content-Length", str(1 << 20))
        handler.end_headers()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            handler.write(b"\0" * 1024)
            time.sleep(0.1)

    url = media_server.route("/r13/trickle.wav", trickle_once)
    try:
        with _api(settings, SILENT_QUEUE) as client, \
                _worker(tmp_path_factory.mktemp("r13-silent"), "r13silent", SILENT_QUEUE, env) as worker:
            r = client.post("/jobs/embedding", data={"file_url": url})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            _wait(lambda: (store.get(job_id).step == "downloading" and served), 30, "the download never started")
            # the job store's keys are "aa:..."; the broker's and Celery's results' are not
            proxy.silence(f"{settings.redis_key_prefix}:".encode())
            _wait(lambda: proxy.silenced >= 1, 10, "no connection of the job store went silent")
            silenced_at = time.monotonic()
            done = wait_for_job(client, job_id, timeout_s=40)
            print(f"\njob ended {time.monotonic() - silenced_at:.1f} s after Redis went silent "
                  f"({proxy.silenced} connections)")
            assert done["status"] == "failed" and done["attempts"] == 2, done
            assert done["error"]["status_code"] == 422 and "404" in done["error"]["detail"], done["error"]
            assert f"job {job_id} interrupted, job store unreachable" in worker.log.read_text(errors="replace")
            # and the worker heartbeats again, on connections of its own
            since = time.monotonic()
            _wait(lambda: any(w["worker"].startswith("r13silent@") and w["pid"] and
                              time.time() - _ts(w["last_seen"]) < 2 for w in store.workers()),
                  10, f"the worker no longer heartbeats ({time.monotonic() - since:.0f} s)")
    finally:
        proxy.close()
        store.redis.delete(*queue_keys(SILENT_QUEUE))


SILENT_BROKER_QUEUE, SILENT_HOOKS = "audio-r13-quiet", "webhooks-r13-quiet"


def test_a_broker_connection_gone_silent_as_a_job_ends_does_not_stop_the_worker_for_good(
        service_env, settings, media_server, tmp_path_factory):
    """A worker reaches Redis through a proxy. Its first job ends and queues its webhook's delivery
    (nobody consumes that queue here); then the connection its deliveries were published on goes
    silent. The second job ends, its record is written (the job store's connections are not the
    broker's), and its delivery is published on the silent connection. kombu gives the broker's
    connections no socket timeout (its Transport says None, over redis-py's own 5 s), so the publish
    waited for good: the worker never took another job, while its heartbeat (another thread, the job
    store's connections) told /health it was there and kept the queue's consumers key alive, so
    synchronous calls were taken for it. With the broker's socket timeout, the publish fails over to a
    new connection, the delivery is queued and the third job runs."""
    from shared.queue import queue_keys

    store = _store(settings)
    redis_port = urlsplit(settings.redis_url).port or 6379
    proxy = SilencingProxy(redis_port)
    via_proxy = f"redis://127.0.0.1:{proxy.port}/{urlsplit(settings.redis_url).path.strip('/') or 0}"
    env = {"AUDIO_ANALYSIS_QUEUE_NAME": SILENT_BROKER_QUEUE, "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": SILENT_HOOKS,
           "REDIS_URL": via_proxy, "AUDIO_ANALYSIS_REDIS_URL": via_proxy, **NO_MODELS}
    url = media_server.file("/r13/quiet.wav", b"gone", status=404)
    hook = media_server.url("/r13/quiet-hook")
    api_settings = settings.model_copy(update={"queue_name": SILENT_BROKER_QUEUE, "webhook_queue_name": SILENT_HOOKS})

    def deliveries() -> int:
        return sum(store.redis.llen(key) for key in queue_keys(SILENT_HOOKS))

    def job(client: Any) -> str:
        r = client.post("/jobs/embedding", data={"file_url": url, "webhook_url": hook})
        assert r.status_code == 202, r.text
        return r.json()["job_id"]

    try:
        with _api_with(api_settings) as client, \
                _worker(tmp_path_factory.mktemp("r13-quiet"), "r13quiet", SILENT_BROKER_QUEUE, env):
            first = wait_for_job(client, job(client), timeout_s=30)
            assert first["status"] == "failed" and first["error"]["status_code"] == 422, first
            _wait(lambda: deliveries() == 1, 10, "the first delivery was not queued")
            proxy.silence(SILENT_HOOKS.encode())
            second = wait_for_job(client, job(client), timeout_s=30)
            assert second["status"] == "failed", second
            _wait(lambda: proxy.silenced >= 1, 10, "the second delivery was not published on the silenced connection")
            silenced_at = time.monotonic()
            third = wait_for_job(client, job(client), timeout_s=45)
            print(f"\nthird job ended {time.monotonic() - silenced_at:.1f} s after the broker connection went silent")
            assert third["status"] == "failed" and third["attempts"] == 1, third
            _wait(lambda: deliveries() == 3, 10, f"deliveries queued: {deliveries()} of 3")
    finally:
        proxy.close()
        store.redis.delete(*queue_keys(SILENT_BROKER_QUEUE), *queue_keys(SILENT_HOOKS))


# --- a worker whose pool processes die loading the models -------------------------------------------

DYING_QUEUE = "audio-r13-dying"


def test_a_worker_whose_pool_processes_keep_dying_as_they_load_the_models_takes_no_synchronous_call(
        service_env, settings, utterances, media_server, tmp_path_factory):
    """A prefork worker whose pool process is killed while it loads the models (the OOM killer: the
    models do not fit in what memory is left), each time: its parent starts another, which loads
    again. Each announced the worker's queues from its start, so the queue's consumers key never
    lapsed (a 15 s lifetime at the default 5 s heartbeat; a process every second or so): a
    synchronous call was taken for a worker that could never run it, and waited for the sync
    timeout (an hour) for its 504, where a worker whose load raised is answered 503 at once. After
    two processes died loading, the next announces the queues only once its load succeeded: the
    key lapses, and the call is answered 503 at once.

    And a job submitted meanwhile: the dying worker's parent takes its message (it consumes the
    queue whatever its pool processes do) and holds it for a process that never becomes ready, so
    the job stayed "queued" until the broker's visibility timeout (6 h), though a healthy worker
    started beside it. Each worker's recovery pass now sends again the message of a queued job
    that a worker has held unstarted for two leases and a pass (worker/recovery.py
    ``recover_reserved_jobs``): the healthy worker runs it."""
    import sys

    from cli.launcher import Stack

    store = _store(settings)
    base = tmp_path_factory.mktemp("r13-dying")
    stack = Stack(log_dir=base)
    # kept up past its third death (it now exits then: tests/test_worker_lifecycle_gaps.py), to
    # show what a worker does while its processes die
    env = {"AUDIO_ANALYSIS_QUEUE_NAME": DYING_QUEUE, "AUDIO_ANALYSIS_WORKER_HEARTBEAT_INTERVAL_S": "5",
           "AUDIO_ANALYSIS_WORKER_MAX_LOAD_DEATHS": "0"}
    clip = utterances["spk1"][0]
    try:
        proc = stack.spawn("r13dying", [
            sys.executable, "-m", "tests._dying_load_worker", "--pool", "prefork", "--concurrency", "1",
            "-Q", DYING_QUEUE, "-n", "r13dying@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        ], env=env)
        log = base / "r13dying.log"

        def deaths() -> int:
            return log.read_text(errors="replace").count("exited with 'signal 9 (SIGKILL)'") if log.exists() else 0

        _wait(lambda: deaths() >= 2, 60, "the pool processes did not die loading", step=0.2)
        assert proc.poll() is None, "the worker itself ended"
        # its queue's key lapses (it lives 15 s) while processes go on dying
        _wait(lambda: not store.redis.exists(store.consumers_key(DYING_QUEUE)), 20,
              "the queue is still announced for a worker that cannot run a job", step=0.2)
        # and the worker goes on starting processes that die (a third, however slow the host)
        _wait(lambda: deaths() >= 3, 60, "the worker stopped starting pool processes", step=0.2)
        with _api(settings, DYING_QUEUE) as client:
            started = time.monotonic()
            r = client.post("/diarize", files={"file": (clip.name, clip.read_bytes(), "audio/wav")})
            assert r.status_code == 503 and time.monotonic() - started < 5, (r.status_code, r.text)
            assert "no worker is running" in r.json()["detail"]
            r = client.post("/jobs/embedding", data={"file_url": media_server.file("/r13/dying.wav", b"gone", status=404)})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            _wait(lambda: f"[{job_id}] received" in log.read_text(errors="replace"), 20,
                  "the dying worker did not take the job's message", step=0.2)
            with _worker(base, "r13healthy", DYING_QUEUE, {"AUDIO_ANALYSIS_QUEUE_NAME": DYING_QUEUE, **NO_MODELS}):
                done = wait_for_job(client, job_id, timeout_s=30)
            # run by the healthy worker, once: its audio's URL answered 404
            assert done["status"] == "failed" and done["attempts"] == 1, done
            assert done["error"]["status_code"] == 422 and "404" in done["error"]["detail"], done["error"]
    finally:
        stack.stop()
        store.redis.delete(*_queue_keys(DYING_QUEUE))
