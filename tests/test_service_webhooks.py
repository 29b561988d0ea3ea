"""Webhook delivery from the real worker to a receiver on 127.0.0.1: signature, retry, exactly once."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

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


def _submit(client, utterance, url):
    r = client.post("/jobs/embedding", files={"file": (utterance.name, utterance.read_bytes(), "audio/wav")},
                    data={"webhook_url": url})
    assert r.status_code == 202, r.text
    assert r.json()["webhook"] == {"status": "pending", "attempts": 0, "last_error": None, "delivered_at": None}
    return r.json()["job_id"]


def test_webhook_is_signed_and_carries_the_result(client, utterances, webhook_receiver):
    job_id = _submit(client, utterances["spk1"][0], webhook_receiver.url("/signed"))
    wait_for_job(client, job_id)
    [hit] = _wait_for(lambda: webhook_receiver.for_path("/signed"))
    headers = hit["headers"]
    assert headers["X-AudioAnalysis-Job-Id"] == job_id
    timestamp = headers["X-AudioAnalysis-Timestamp"]
    assert abs(time.time() - int(timestamp)) < 60
    # recompute the HMAC independently of shared.webhooks
    expected = hmac.new(WEBHOOK_SECRET.encode(), f"{timestamp}.".encode() + hit["body"], hashlib.sha256).hexdigest()
    assert headers["X-AudioAnalysis-Signature"] == f"sha256={expected}"
    assert webhooks.verify(WEBHOOK_SECRET, timestamp, hit["body"], headers["X-AudioAnalysis-Signature"])
    assert not webhooks.verify("wrong-secret", timestamp, hit["body"], headers["X-AudioAnalysis-Signature"])
    payload = json.loads(hit["body"])
    assert payload["job_id"] == job_id and payload["status"] == "succeeded"
    assert len(payload["result"]["embedding"]) == 192
    assert _wait_for(lambda: client.get(f"/jobs/{job_id}").json()["webhook"]["status"] == "delivered")


def test_failed_delivery_is_retried_and_arrives_once(client, utterances, webhook_receiver, worker):
    webhook_receiver.statuses[:] = [500]
    job_id = _submit(client, utterances["spk2"][0], webhook_receiver.url("/flaky"))
    wait_for_job(client, job_id)
    _wait_for(lambda: any(h["answered"] == 200 for h in webhook_receiver.for_path("/flaky")), 30)
    hits = webhook_receiver.for_path("/flaky")
    assert [h["answered"] for h in hits] == [500, 200]
    # backoff: the retry came after the configured first delay (1 s), not immediately
    assert hits[1]["at"] - hits[0]["at"] >= 0.9
    assert hits[0]["body"] == hits[1]["body"]
    record = client.get(f"/jobs/{job_id}").json()
    assert record["webhook"]["status"] == "delivered" and record["webhook"]["attempts"] == 2

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
