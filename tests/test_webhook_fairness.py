"""One tenant's hanging webhook receivers must not hold every delivery thread.

A real webhook worker (threads pool, 2 threads, as compose's ``webhooks`` service runs it, with a
10 s deadline per POST), real Redis, real HTTP receivers on 127.0.0.1. Tenant A's six receivers
take the connection and answer nothing until the test lets them; tenant B's answers at once. B's
delivery, sent once A's are in flight, must arrive within a few seconds: before the per-tenant cap
(worker/webhook_share.py) both threads were A's until the deadline, 10 s and more. A's deliveries
are then all made, each once and at attempt 1 (a delivery deferred for its tenant's cap is not an
attempt, and none is dropped).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.conftest import WEBHOOK_SECRET, drop_namespace

PREFIX = "aa-h6-fair"
HOOKS = "webhooks-h6-fair"
DEADLINE_S = 10.0
HANGING = 6
# B's delivery must arrive well within the hanging receivers' deadline (measured: well under 1 s
# with the cap; before it, not before A's first deliveries' deadline, 10 s)
PROMPT_BOUND_S = 6.0


class _Receivers:
    """``/hang/<n>`` waits (until ``release`` is set) before it answers 204; ``/prompt`` answers
    at once. Each hit is logged with its time and headers as it arrives."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.hits: list[dict[str, Any]] = []
        self.waiting = 0
        self.most_waiting = 0
        self.lock = threading.Lock()
        receivers = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receivers.lock:
                    receivers.hits.append({"path": self.path, "at": time.monotonic(), "body": body,
                                           "headers": dict(self.headers)})
                if self.path.startswith("/hang/"):
                    with receivers.lock:
                        receivers.waiting += 1
                        receivers.most_waiting = max(receivers.most_waiting, receivers.waiting)
                    receivers.release.wait(60)
                    with receivers.lock:
                        receivers.waiting -= 1
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def for_path(self, prefix: str) -> list[dict[str, Any]]:
        with self.lock:
            return [h for h in self.hits if h["path"].startswith(prefix)]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _wait(predicate, timeout_s: float, what: Any) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, what() if callable(what) else what
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_tenants_hanging_receivers_leave_other_tenants_deliveries_prompt(service_env, settings, tmp_path_factory):
    from cli.launcher import Stack
    from shared import webhooks
    from shared.jobs import CANCELLED, JobRecord, JobStore, new_job_id
    from shared.queue import WEBHOOK_TASK, make_celery, queue_keys

    mine = settings.model_copy(update={"redis_key_prefix": PREFIX, "webhook_queue_name": HOOKS})
    store = JobStore.from_settings(mine)
    receivers = _Receivers()
    stack = Stack(log_dir=tmp_path_factory.mktemp("h6-fair"))
    celery = make_celery(mine)

    def owed(owner: str, path: str) -> str:
        """A job of ``owner``'s that ended, its delivery owed (as a worker's _notify leaves it)
        and sent."""
        job_id = new_job_id()
        store.create_queued(JobRecord(job_id=job_id, kind="embedding", status="queued", owner=owner,
                                      webhook_url=receivers.url(path)))
        store.confirm_queued([job_id])
        store.finish(job_id, CANCELLED, notify=True)
        celery.send_task(WEBHOOK_TASK, args=(job_id,), queue=HOOKS)
        return job_id

    try:
        stack.start_worker(queues=[HOOKS], name="h6hooks", pool="threads", concurrency=2, env={
            "AUDIO_ANALYSIS_REDIS_KEY_PREFIX": PREFIX, "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": HOOKS,
            "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false", "AUDIO_ANALYSIS_WEBHOOK_DEADLINE_S": str(DEADLINE_S),
            "AUDIO_ANALYSIS_WEBHOOK_TIMEOUT_S": str(DEADLINE_S),
        })
        assert stack.wait_for_queues(mine, [HOOKS], 90), (stack.log_dir / "h6hooks.log").read_text(errors="replace")
        hanging = [owed("tenant-a", f"/hang/{n}") for n in range(HANGING)]
        _wait(lambda: receivers.waiting >= 1, 30, "no hanging delivery was made")
        time.sleep(1.0)  # the worker has taken (and, capped, deferred) more of A's deliveries

        sent = time.monotonic()
        prompt = owed("tenant-b", "/prompt")
        took = _wait(lambda: receivers.for_path("/prompt"), PROMPT_BOUND_S,
                     lambda: f"B's delivery waited over {PROMPT_BOUND_S} s behind A's {receivers.waiting} "
                             f"hanging ones (deadline {DEADLINE_S} s, 2 threads)")
        print(f"\nB's delivery arrived {took:.2f} s after it was sent, behind {HANGING} hanging deliveries "
              f"(2 threads, {DEADLINE_S:g} s deadline); A held {receivers.most_waiting} at most")
        [hit] = receivers.for_path("/prompt")
        assert hit["at"] - sent < PROMPT_BOUND_S
        # signed with B's own secret, as ever
        secret = webhooks.signing_secret(WEBHOOK_SECRET, "tenant-b")
        assert webhooks.verify(secret, hit["headers"]["X-AudioAnalysis-Timestamp"], hit["body"],
                               hit["headers"]["X-AudioAnalysis-Signature"])
        # the default cap: half the worker's 2 threads
        assert receivers.most_waiting == 1, receivers.most_waiting
        _wait(lambda: store.get(prompt).webhook.status == "delivered", 10, lambda: store.get(prompt).webhook)

        # A's receivers answer now: every one of A's deliveries is made, once, at its first attempt
        receivers.release.set()
        _wait(lambda: all(store.get(j).webhook.status == "delivered" for j in hanging), 30,
              lambda: [store.get(j).webhook for j in hanging])
        for n, job_id in enumerate(hanging):
            [hit] = receivers.for_path(f"/hang/{n}")
            assert hit["headers"]["X-AudioAnalysis-Job-Id"] == job_id
            assert hit["headers"]["X-AudioAnalysis-Attempt"] == "1"
            assert store.get(job_id).webhook.attempts == 1
            assert store.webhook_due_at(job_id) is None
        # every slot given back
        assert not store.redis.keys(f"{PREFIX}:webhooks:in-flight:*")
    finally:
        receivers.close()
        stack.stop()
        celery.close()
        drop_namespace(settings.redis_url, PREFIX, *queue_keys(HOOKS))


def test_a_slot_lapses_by_itself_and_the_cap_is_per_tenant(service_env, settings):
    """A worker killed mid-POST never gives its slot back: the slot lapses after the time it was
    taken for, and the tenant has its share again. Other tenants (and the jobs without an owner,
    one tenant together) are counted apart; a delivery that holds a slot keeps it when it looks
    again (its retry, a copy of its message)."""
    from shared.jobs import JobStore
    from worker.webhook_share import TenantSlots, tenant_cap

    store = JobStore.from_settings(settings.model_copy(update={"redis_key_prefix": PREFIX}))
    try:
        a, b, nobody = TenantSlots(store, "tenant-a"), TenantSlots(store, "tenant-b"), TenantSlots(store, None)
        assert a.take("killed", 1, 1.0)
        assert not a.take("next", 1, 30.0)
        assert a.take("killed", 1, 1.0)  # its own slot, kept
        assert b.take("other", 1, 30.0) and nobody.take("ownerless", 1, 30.0)
        assert not nobody.take("ownerless-2", 1, 30.0)
        time.sleep(1.3)
        assert a.held() == 0
        assert a.take("next", 1, 30.0)
        a.give_back("next")
        assert a.held() == 0 and b.held() == 1
        # the default: half the worker's threads, at least 1; 0 turns the cap off
        assert tenant_cap(None, 8) == 4 and tenant_cap(None, 1) == 1 and tenant_cap(0, 8) is None
        assert tenant_cap(3, 8) == 3
    finally:
        drop_namespace(settings.redis_url, PREFIX)
