"""Webhook delivery from the real worker to a receiver on 127.0.0.1: signature, retry (with its
attempt header), exactly once, and the status-only payload."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import pytest

from shared import webhooks
from tests.conftest import WEBHOOK_SECRET, wait_for_job


def _wait_for(predicate, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _submit(client, utterance, url, **data):
    r = client.post("/jobs/embedding", files={"file": (utterance.name, utterance.read_bytes(), "audio/wav")},
                    data={"webhook_url": url, **data})
    assert r.status_code == 202, r.text
    assert r.json()["webhook"] == {"status": "pending", "attempts": 0, "last_error": None, "delivered_at": None}
    assert r.json()["webhook_payload"] == data.get("webhook_payload", "full")
    return r.json()["job_id"]


def test_webhook_is_signed_and_carries_the_result(client, utterances, webhook_receiver):
    job_id = _submit(client, utterances["spk1"][0], webhook_receiver.url("/signed"))
    wait_for_job(client, job_id)
    [hit] = _wait_for(lambda: webhook_receiver.for_path("/signed"))
    headers = hit["headers"]
    assert headers["X-AudioAnalysis-Job-Id"] == job_id
    assert headers["X-AudioAnalysis-Attempt"] == "1"
    timestamp = headers["X-AudioAnalysis-Timestamp"]
    assert abs(time.time() - int(timestamp)) < 60
    # recompute the HMAC independently of shared.webhooks
    expected = hmac.new(WEBHOOK_SECRET.encode(), f"{timestamp}.".encode() + hit["body"], hashlib.sha256).hexdigest()
    assert headers["X-AudioAnalysis-Signature"] == f"sha256={expected}"
    assert webhooks.verify(WEBHOOK_SECRET, timestamp, hit["body"], headers["X-AudioAnalysis-Signature"])
    assert not webhooks.verify("wrong-secret", timestamp, hit["body"], headers["X-AudioAnalysis-Signature"])
    payload = json.loads(hit["body"])
    assert payload["job_id"] == job_id and payload["status"] == "succeeded"
    assert len(payload["result"]["embedding"]) == 192 and payload["webhook_payload"] == "full"
    assert "webhook" not in payload
    assert _wait_for(lambda: client.get(f"/jobs/{job_id}").json()["webhook"]["status"] == "delivered")


def test_failed_delivery_is_retried_and_arrives_once(client, utterances, webhook_receiver, worker):
    webhook_receiver.statuses[:] = [500]
    job_id = _submit(client, utterances["spk2"][0], webhook_receiver.url("/flaky"))
    wait_for_job(client, job_id)
    _wait_for(lambda: any(h["answered"] == 200 for h in webhook_receiver.for_path("/flaky")), 30)
    hits = webhook_receiver.for_path("/flaky")
    assert [h["answered"] for h in hits] == [500, 200]
    # every delivery says which attempt it is: the receiver can tell a retry from a first try
    assert [h["headers"]["X-AudioAnalysis-Attempt"] for h in hits] == ["1", "2"]
    # backoff: the retry came after the configured first delay (1 s), not immediately
    assert hits[1]["at"] - hits[0]["at"] >= 0.9
    assert hits[0]["body"] == hits[1]["body"]
    # the receiver logs a hit before it answers, and the worker records the delivery only once
    # the 200 reached it: waited for, not read once (that read raced the worker's write)
    record = _wait_for(lambda: (body := client.get(f"/jobs/{job_id}").json())["webhook"]["status"] == "delivered"
                       and body, 10)
    assert record["webhook"]["status"] == "delivered" and record["webhook"]["attempts"] == 2, record

    # a redelivered job (or a duplicate delivery task) must not fire the webhook again
    from shared.queue import make_celery
    from shared.settings import Settings

    settings = Settings()
    make_celery(settings).send_task("audio.deliver_webhook", args=(job_id,), queue=settings.webhook_queue_name)
    time.sleep(2.5)
    assert len(webhook_receiver.for_path("/flaky")) == 2


def test_cancelled_job_notifies_its_webhook(client, long_sample, webhook_receiver):
    r = client.post("/jobs/diarize", files={"file": (long_sample.name, long_sample.read_bytes(), "audio/wav")},
                    data={"webhook_url": webhook_receiver.url("/cancelled")})
    job_id = r.json()["job_id"]
    assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    [hit] = _wait_for(lambda: webhook_receiver.for_path("/cancelled"), 60)
    assert json.loads(hit["body"])["status"] == "cancelled"
    # the worker's own pass over the cancelled job does not send a second one
    time.sleep(1.5)
    assert len(webhook_receiver.for_path("/cancelled")) == 1


def test_status_only_webhook_leaves_the_result_to_be_fetched(client, utterances, webhook_receiver):
    webhook_receiver.statuses[:] = [503]
    job_id = _submit(client, utterances["spk1"][1], webhook_receiver.url("/status-only"), webhook_payload="status")
    done = wait_for_job(client, job_id)
    _wait_for(lambda: any(h["answered"] == 200 for h in webhook_receiver.for_path("/status-only")), 30)
    hits = webhook_receiver.for_path("/status-only")
    assert [(h["answered"], h["headers"]["X-AudioAnalysis-Attempt"]) for h in hits] == [(503, "1"), (200, "2")]
    for hit in hits:
        headers = hit["headers"]
        assert webhooks.verify(WEBHOOK_SECRET, headers["X-AudioAnalysis-Timestamp"], hit["body"],
                               headers["X-AudioAnalysis-Signature"])
        payload = json.loads(hit["body"])
        # the record without its result (nor its webhook state): the receiver fetches the result
        assert "result" not in payload and "webhook" not in payload
        assert payload["job_id"] == job_id and payload["status"] == "succeeded" and payload["kind"] == "embedding"
        assert payload["webhook_payload"] == "status" and payload["error"] is None
    fetched = client.get(f"/jobs/{job_id}/result")
    assert fetched.status_code == 200 and fetched.json() == done["result"]
    assert len(fetched.json()["embedding"]) == 192


def test_webhook_payload_is_checked_and_needs_a_webhook(client, utterances, webhook_receiver):
    clip = utterances["spk1"][2]
    files = {"file": (clip.name, clip.read_bytes(), "audio/wav")}
    r = client.post("/jobs/embedding", files=files, data={"webhook_url": webhook_receiver.url("/x"),
                                                          "webhook_payload": "summary"})
    assert r.status_code == 422 and "webhook_payload" in r.json()["detail"]
    # without a webhook there is nothing to carry: refused, where it was taken (202) and dropped,
    # and a client that forgot or misspelt webhook_url waited for a delivery that never came
    r = client.post("/jobs/embedding", files=files, data={"webhook_payload": "status"})
    assert r.status_code == 422 and r.json()["detail"].startswith("webhook_payload: given without webhook_url")
    # a batch passes it to each of its jobs
    r = client.post("/jobs/batch", data={"kind": "embedding", "webhook_url": webhook_receiver.url("/batch-status"),
                                         "webhook_payload": "status"}, files=[("files", files["file"])] * 2)
    assert r.status_code == 202, r.text
    assert [j["webhook_payload"] for j in r.json()["jobs"]] == ["status", "status"]
    hits = _wait_for(lambda: len(webhook_receiver.for_path("/batch-status")) == 2
                     and webhook_receiver.for_path("/batch-status"), 60)
    assert all("result" not in json.loads(h["body"]) for h in hits)


def test_each_api_key_has_its_deliveries_signed_with_a_secret_of_its_own(variant_app, utterances, webhook_receiver):
    """With one secret for every tenant, key A could submit a job whose webhook is key B's receiver
    and have the service send it a correctly signed body of A's choosing (job id, file name,
    result). Each key's deliveries are now signed with its own secret (``GET /webhooks/secret``):
    B's receiver, checking with B's secret, refuses A's delivery. Without keys, the operator's
    secret signs, as the first test shows, and the API does not hand it out."""
    key_a, key_b = "tenant-a-0123456789abcdef", "tenant-b-0123456789abcdef"
    from pydantic import SecretStr

    api = variant_app(api_keys=[SecretStr(key_a), SecretStr(key_b)])
    secrets = {}
    for name, key in (("a", key_a), ("b", key_b)):
        r = api.get("/webhooks/secret", headers={"X-API-Key": key})
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store", r.text
        secrets[name] = r.json()["secret"]
    assert len(set(secrets.values()) | {WEBHOOK_SECRET}) == 3
    assert api.get("/webhooks/secret").status_code == 401

    utterance = utterances["spk2"][0]
    r = api.post("/jobs/embedding", headers={"X-API-Key": key_a},
                 files={"file": (utterance.name, utterance.read_bytes(), "audio/wav")},
                 data={"webhook_url": webhook_receiver.url("/tenant-b-receiver")})
    assert r.status_code == 202, r.text
    [hit] = _wait_for(lambda: webhook_receiver.for_path("/tenant-b-receiver"), 90)
    timestamp, signature = hit["headers"]["X-AudioAnalysis-Timestamp"], hit["headers"]["X-AudioAnalysis-Signature"]
    assert json.loads(hit["body"])["job_id"] == r.json()["job_id"]
    assert webhooks.verify(secrets["a"], timestamp, hit["body"], signature)
    assert not webhooks.verify(secrets["b"], timestamp, hit["body"], signature)
    assert not webhooks.verify(WEBHOOK_SECRET, timestamp, hit["body"], signature)


def test_without_api_keys_the_operators_secret_is_not_handed_out(client):
    r = client.get("/webhooks/secret")
    assert r.status_code == 404 and set(r.json()) == {"detail", "error_type", "timestamp"}, r.text
    assert WEBHOOK_SECRET not in r.text


# --- what webhook.last_error says of a failed attempt ----------------------------------------------


class _Receiver:
    """A TCP server on 127.0.0.1 that takes each connection and either holds it without a word or
    closes it once the request arrived."""

    def __init__(self, answer: str) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.held: list[socket.socket] = []
        self.answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.answer == "close":
                conn.recv(65536)
                conn.close()
            else:
                self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def _last_error(url: str, timeout_s: float, deadline_s: float) -> str:
    with pytest.raises(webhooks.WebhookDeliveryError) as caught:
        webhooks.post(url, "job", {"x": 1}, "s" * 32, timeout_s, allow_private=True, deadline_s=deadline_s)
    return str(caught.value)


def test_a_receiver_that_never_answers_is_a_timeout_not_a_failed_connection():
    """httpx.ReadTimeout (connected, no answer) said "delivery failed: could not connect", which
    sent the receiver's owner looking for a firewall; it says what ran out now, and nothing of the
    address (the policy's verdicts name addresses a host resolved to)."""
    silent = _Receiver("never")
    try:
        per_read = _last_error(silent.url, 0.5, 5.0)
        whole = _last_error(silent.url, 5.0, 0.7)  # the attempt's deadline ran out first
    finally:
        silent.close()
    assert per_read == "delivery failed: connected, then timed out after 0.5 s waiting for the answer", per_read
    assert whole == "delivery failed: connected, then timed out after 0.7 s waiting for the answer", whole

    hangs_up = _Receiver("close")
    try:
        closed = _last_error(hangs_up.url, 2.0, 5.0)
    finally:
        hangs_up.close()
    assert closed == "delivery failed: connected, but the connection ended without a valid answer", closed

    from cli.launcher import free_port

    refused = _last_error(f"http://127.0.0.1:{free_port()}/hook", 2.0, 5.0)
    assert refused == "delivery failed: could not connect", refused
    for message in (per_read, whole, closed, refused):
        assert "127.0.0.1" not in message and "hook" not in message
