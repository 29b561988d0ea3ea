"""More of what a hostile or careless client tried, against real processes (the session's Redis
and Celery worker, the API in-process), after tests/test_hostile_inputs.py.

Each test fails on the code before its fix:

* a voiceprint label with a line break (``Ann\\nLee``, U+2028), DEL or a right-to-left override
  (U+202E, which shows ``SPEAKER_00`` as ``00_REKAEPS`` in the subtitles next to it) was stored,
  or refused only after a worker had embedded every file of the enrollment: ``POST /voiceprints``
  checked the label once the job was done;
* one API key could store voiceprints without end (an import is a cheap request, each keeps about
  5 KB in a Redis that never evicts them): a loop of imports filled Redis, and then no job of any
  tenant could be stored.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydantic import SecretStr

ERROR_KEYS = {"detail", "error_type", "timestamp"}


def _assert_error(r, status: int, fragment: str = "") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == ERROR_KEYS, body
    assert fragment.lower() in body["detail"].lower(), body["detail"]
    return body


def _wav(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "audio/wav")


def _enroll_jobs(client) -> set[str]:
    return {j["job_id"] for j in client.get("/jobs", params={"kind": "enroll", "limit": 100}).json()["jobs"]}


# --- voiceprint labels: one line of printable text, checked before any work ---------------------


@pytest.mark.parametrize("label", ["Ann\nLee", "Ann\u2028Lee", "Ann\x7fLee", "Ann\x85Lee", "\u202eAnn Lee",
                                   "Ann\u2066Lee"])
def test_a_label_that_could_break_a_line_or_reorder_one_is_refused_before_any_job(client, utterances, label):
    before = _enroll_jobs(client)
    r = client.post("/voiceprints", files=[("files", _wav(utterances["spk1"][0]))], data={"label": label})
    _assert_error(r, 422, "label")
    assert _enroll_jobs(client) == before, "a worker enrolled the files of a request refused for its label"
    assert r.json()["detail"].startswith("label:"), r.json()["detail"]
    # the same rule for a job's own enrollment and for an import
    r = client.post("/jobs/enroll", files=[("files", _wav(utterances["spk1"][0]))], data={"label": label})
    _assert_error(r, 422, "label")
    r = client.post("/voiceprints/import", files={"file": ("v.json", b"[" + b"0.1," * 191 + b"0.1]", "application/json")},
                    data={"label": label, "model": "3d-speaker/campplus-cn-en-common"})
    _assert_error(r, 422, "label")
    assert _enroll_jobs(client) == before


def test_names_in_any_script_are_still_labels(client):
    # joiners are part of Persian names and emoji; direction marks are harmless
    for label in ("\u0645\u06cc\u200c\u0631\u0627", "Zo\u00eb \u200fO'Brien", "\U0001f469\u200d\U0001f52c Ada"):
        r = client.post("/voiceprints/import", files={"file": ("v.json", b"[" + b"0.1," * 191 + b"0.1]", "application/json")},
                        data={"label": label, "model": "3d-speaker/campplus-cn-en-common"})
        assert r.status_code == 201, r.text
        assert r.json()["label"] == label
        assert client.delete(f"/voiceprints/{r.json()['id']}").status_code == 204


# --- voiceprints: a bounded number per API key ---------------------------------------------------

VECTOR = ("v.json", b"[" + b"0.1," * 191 + b"0.1]", "application/json")
MODEL = {"model": "3d-speaker/campplus-cn-en-common"}


def test_one_key_cannot_store_voiceprints_without_end(variant_app, utterances):
    capped = variant_app(api_keys=[SecretStr("cap-a"), SecretStr("cap-b")], voiceprints_max_per_owner=3)
    a, b = {"X-API-Key": "cap-a"}, {"X-API-Key": "cap-b"}
    # concurrent imports: the count and the write are one transaction, so no more than 3 pass
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(
        capped.post("/voiceprints/import", files={"file": VECTOR}, data={"label": "Ann", **MODEL}, headers=a).status_code))
        for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [201] * 3 + [409] * 5, answers
    assert capped.get("/voiceprints", headers=a).json()["count"] == 3
    r = capped.post("/voiceprints/import", files={"file": VECTOR}, data={"label": "Ann", **MODEL}, headers=a)
    _assert_error(r, 409, "delete some")
    # an enrollment is refused before a worker embeds its files
    jobs = {j["job_id"] for j in capped.get("/jobs", params={"limit": 100}, headers=a).json()["jobs"]}
    r = capped.post("/voiceprints", files=[("files", _wav(utterances["spk1"][0]))], data={"label": "Ann"}, headers=a)
    _assert_error(r, 409, "delete some")
    assert {j["job_id"] for j in capped.get("/jobs", params={"limit": 100}, headers=a).json()["jobs"]} == jobs
    # another key has its own room; a deletion makes room again
    assert capped.post("/voiceprints/import", files={"file": VECTOR}, data={"label": "Bo", **MODEL},
                       headers=b).status_code == 201
    first = capped.get("/voiceprints", headers=a).json()["voiceprints"][0]["id"]
    assert capped.delete(f"/voiceprints/{first}", headers=a).status_code == 204
    assert capped.post("/voiceprints/import", files={"file": VECTOR}, data={"label": "Ann", **MODEL},
                       headers=a).status_code == 201
    for key in (a, b):
        for vp in capped.get("/voiceprints", headers=key).json()["voiceprints"]:
            capped.delete(f"/voiceprints/{vp['id']}", headers=key)
