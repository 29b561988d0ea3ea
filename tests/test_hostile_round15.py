"""A fifteenth round of what a hostile or careless client tried against the API, after the
earlier rounds (tests/test_hostile_*.py, test_security.py): the job lifecycle under the client's
control (cancels, retries with an Idempotency-Key, voiceprints deleted meanwhile).

Each test fails on the code before its fix:

* an enrolment (``POST /voiceprints``) sent with an ``Idempotency-Key`` and retried after its
  voiceprint was deleted was answered its job's result again, and the voiceprint stored again
  under the id the delete had been answered 204 for (with a new ``created_at``): a delete undone
  by a client's retry. The delete now leaves a tombstone for as long as a retry can be answered,
  and the retry is a 409 that says so (``VoiceprintStore.delete``, ``create``);
* diarization's ``identification_threshold`` sent without ``voiceprints`` (forgotten, misspelt, or
  sent empty) was taken and dropped: 202 (200 on ``POST /diarize``), and speakers never named,
  with no sign why. It is a 422 now, as ``webhook_payload`` without ``webhook_url`` is
  (``Dispatcher.read``).
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
    assert client.delete(f"/voiceprints/{voiceprint_id}").status_code == 204

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
