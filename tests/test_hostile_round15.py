"""A fifteenth round of what a hostile or careless client tried against the API, after the
earlier rounds (tests/test_hostile_*.py, test_security.py): the job lifecycle under the client's
control (cancels, retries with an Idempotency-Key, voiceprints deleted meanwhile).

Each test fails on the code before its fix:

* an enrolment (``POST /voiceprints``) sent with an ``Idempotency-Key`` and retried after its
  voiceprint was deleted was answered its job's result again, and the voiceprint stored again
  under the id the delete had been answered 204 for (with a new ``created_at``): a delete undone
  by a client's retry. The delete now leaves a tombstone for as long as a retry can be answered,
  and the retry is a 409 that says so (``VoiceprintStore.delete``, ``create``). The enrolment's
  job result, which held the same vector for a day after the delete, no longer holds it;
* diarization's ``identification_threshold`` sent without ``voiceprints`` (forgotten, misspelt, or
  sent empty) was taken and dropped: 202 (200 on ``POST /diarize``), and speakers never named,
  with no sign why. It is a 422 now, as ``webhook_payload`` without ``webhook_url`` is
  (``Dispatcher.read``);
* a cancel whose revoke met a failing broker (a Redis blip after the cancel was recorded) was
  answered 500, and its webhook not queued: the client retried and was told 409. It is answered
  200, the revoke and the webhook left to the worker's own check and the recovery pass
  (``Dispatcher.cancel``).
"""

from __future__ import annotations

import pytest

from tests.conftest import newest_job_ids, tone_wav


def test_a_retried_enrolment_does_not_bring_back_a_deleted_voiceprint(client, sample_wav):
    audio = sample_wav.read_bytes()
    headers = {"Idempotency-Key": "r15-enrol-then-delete"}

    def enrol():
        return client.post("/voiceprints", files=[("files", ("ann.wav", audio, "audio/wav"))],
                           data={"label": "Ann R15"}, headers=headers)

    first = enrol()
    assert first.status_code == 201, first.text
    voiceprint_id = first.json()["id"]
    job = client.get(f"/jobs/{voiceprint_id.removeprefix('vp_')}").json()
    assert job["kind"] == "enroll" and len(job["result"]["embedding"]) == 192
    assert client.delete(f"/voiceprints/{voiceprint_id}").status_code == 204
    # the enrolment's job result held the same vector for a day after the delete; the rest of
    # the result stays
    job = client.get(f"/jobs/{voiceprint_id.removeprefix('vp_')}").json()
    assert "embedding" not in job["result"] and job["result"]["label"] == "Ann R15", job["result"]

    retry = enrol()
    # before: 201 with Idempotent-Replayed, and the deleted voiceprint stored again
    assert retry.status_code == 409, retry.text
    body = retry.json()
    assert body["error_type"] == "ValidationError" and "deleted" in body["detail"], body
    assert client.get(f"/voiceprints/{voiceprint_id}").status_code == 404
    listed = [vp["id"] for vp in client.get("/voiceprints", params={"limit": 1000}).json()["voiceprints"]]
    assert voiceprint_id not in listed


@pytest.mark.parametrize("route, field, extra", [
    ("/jobs/diarize", "file", {}),
    ("/diarize", "file", {}),
    ("/jobs/diarize", "file", {"voiceprints": ""}),
    ("/jobs/batch", "files", {"kind": "diarize"}),
])
def test_an_identification_threshold_without_voiceprints_is_refused_not_dropped(client, route, field, extra):
    before = newest_job_ids(client)
    r = client.post(route, files=[(field, ("a.wav", tone_wav(0.5), "audio/wav"))],
                    data={"identification_threshold": "0.9", **extra})
    # before: 202 (200 for /diarize), the threshold dropped and nobody named
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_type"] == "ValidationError" and body["detail"].startswith("identification_threshold:"), body
    assert newest_job_ids(client) == before


def test_a_cancel_is_answered_as_done_when_the_broker_fails_after_it(settings, utterances):
    """The API reaches Redis through a proxy that cuts every connection publishing to Celery's
    control channel (the revoke a cancel sends after recording it): a broker blip at that moment.
    The cancel had happened (the record says cancelled), yet it was answered 5xx, and the client's
    retry 409 "already cancelled"; its webhook was not queued. Now 200 with the cancelled record,
    and the delivery owed is left to the workers' recovery pass (its due time is set)."""
    from urllib.parse import urlsplit

    from fastapi.testclient import TestClient

    from api.main import create_app
    from shared.jobs import JobStore
    from tests.test_worker_redis_blip import CuttingProxy

    parts = urlsplit(settings.redis_url)
    proxy = CuttingProxy(parts.port or 6379)
    try:
        via_proxy = parts._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
        # a queue no worker consumes: the job stays queued until cancelled
        own = settings.model_copy(update={"redis_url": via_proxy, "queue_name": "audio-r15-cancel",
                                          "sync_requires_live_worker": False})
        with TestClient(create_app(own), raise_server_exceptions=False) as api:
            r = api.post("/jobs/embedding", files={"file": ("a.wav", tone_wav(1.0), "audio/wav")},
                         data={"webhook_url": "http://127.0.0.1:18765/hook"})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            proxy.arm(b"celery.pidbox", 1000)
            cancelled = api.post(f"/jobs/{job_id}/cancel")
            assert proxy.cuts[b"celery.pidbox"] >= 1, "the revoke never reached the proxy: nothing was tested"
            assert cancelled.status_code == 200, cancelled.text
            assert cancelled.json()["status"] == "cancelled"
        store = JobStore.from_settings(settings)
        assert store.get(job_id).status == "cancelled"
        assert store.webhook_due_at(job_id) is not None, "the delivery owed is not left to the recovery pass"
    finally:
        proxy.close()
