"""Three gaps of the API, each closed here against the real service (in-process API and a real
uvicorn, the session's Redis and worker, real audio):

1. the synchronous routes (``/diarize``, ``/embedding``, ...) ignored ``Idempotency-Key``: a
   client whose connection dropped retried with its key, and its audio ran a second time (the
   first job was cancelled when the client hung up, half run);
2. ``POST /jobs/batch`` read every file's header (a sandboxed FFmpeg each) before it looked at
   the tenant's quota, so a tenant over it had the API's CPU burnt on batches refused 429 anyway;
3. ``GET /voiceprints?cursor=`` took junk after a cursor (``<cursor>!!``) for the cursor, and
   another API key's cursor for a place in this key's listing.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from tests.conftest import api_under_uvicorn, json_embedding_file, newest_job_ids, tone_wav

ERROR_KEYS = {"detail", "error_type", "timestamp"}


def _error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == ERROR_KEYS, body
    return body


# --- 1. Idempotency-Key on the synchronous routes -------------------------------------------------

def _embed(client: Any, audio: bytes, name: str = "a.wav", key: str | None = None) -> Any:
    return client.post("/embedding", files={"file": (name, audio, "audio/wav")},
                       headers={"Idempotency-Key": key} if key else {})


def test_a_sync_retry_with_its_key_is_answered_the_first_jobs_result_and_runs_nothing(client, utterances):
    """The same /embedding twice with one key: one job (GET /jobs), the same vector, the retry
    marked replayed. The key on another file or route is 422, as on the jobs routes; without a
    key nothing changes (a job each time)."""
    audio = utterances["spk1"][0].read_bytes()
    key = f"sync-{uuid.uuid4()}"
    first = _embed(client, audio, key=key)
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    made = newest_job_ids(client)
    assert made, "the synchronous call made no job"

    retry = _embed(client, audio, key=key)
    assert retry.status_code == 200, retry.text
    assert retry.json() == first.json()
    assert retry.headers.get("idempotent-replayed") == "true"
    assert newest_job_ids(client) == made, "the retry ran a second job"

    # the key reused for another request: refused, nothing run
    other = _embed(client, utterances["spk2"][0].read_bytes(), key=key)
    assert "already used for another request" in _error(other, 422)["detail"]
    elsewhere = client.post("/jobs/embedding", files={"file": ("a.wav", audio, "audio/wav")},
                            headers={"Idempotency-Key": key})
    assert "already used for another request" in _error(elsewhere, 422)["detail"]
    compare = client.post("/compare", headers={"Idempotency-Key": key},
                          files={"file1": ("a.wav", audio, "audio/wav"), "file2": ("a.wav", audio, "audio/wav")})
    _error(compare, 422)
    assert newest_job_ids(client) == made
    # a malformed key is refused before anything runs, as on the jobs routes
    _error(_embed(client, audio, key="k" * 256), 422)
    assert newest_job_ids(client) == made

    # no key: as before, each call its own job
    plain = _embed(client, audio)
    assert plain.status_code == 200 and "idempotent-replayed" not in plain.headers
    assert newest_job_ids(client) != made


def test_a_sync_client_that_hangs_up_and_retries_with_its_key_gets_the_first_jobs_result(
        worker, service_env, tmp_path, long_sample):
    """Over a real uvicorn: the client gives up on /diarize of 2 min of audio (its read timeout:
    the connection is closed, as a proxy's would be) and sends it again with its key. The job
    the first call made runs on, once, and the retry is answered its result. It was cancelled as
    the client hung up, and the retry ran the audio again (two jobs: one cancelled, one run)."""
    api_key = f"sync-hangup-{uuid.uuid4().hex[:8]}"
    key = str(uuid.uuid4())
    audio = long_sample.read_bytes()

    def diarize(http: httpx.Client) -> httpx.Response:
        return http.post("/diarize", files={"file": ("call.wav", audio, "audio/wav")},
                         data={"min_speakers": "1", "max_speakers": "3"}, headers={"Idempotency-Key": key})

    with api_under_uvicorn(service_env, tmp_path, [api_key]) as base:
        with httpx.Client(base_url=base, headers={"X-API-Key": api_key}, timeout=300) as http:
            # the first call's job exists and has been taken, then the client hangs up
            with httpx.Client(base_url=base, headers={"X-API-Key": api_key},
                              timeout=httpx.Timeout(30, read=1.5)) as impatient:
                with pytest.raises(httpx.ReadTimeout):
                    diarize(impatient)
            deadline = time.monotonic() + 30
            while not (jobs := http.get("/jobs").json()["jobs"]):
                assert time.monotonic() < deadline, "the call that hung up made no job"
                time.sleep(0.05)
            (first_job,) = jobs
            for _ in range(100):
                retry = diarize(http)
                if retry.status_code != 409 or "still being submitted" not in retry.text:
                    break
                time.sleep(0.2)
            assert retry.status_code == 200, retry.text
            assert retry.headers.get("idempotent-replayed") == "true"
            assert retry.json()["segments_count"] > 0
            listing = http.get("/jobs").json()["jobs"]
            assert [j["job_id"] for j in listing] == [first_job["job_id"]], json.dumps(listing)[:2000]
            assert listing[0]["status"] == "succeeded" and listing[0]["attempts"] == 1, listing[0]


def test_a_sync_retry_whose_job_was_cancelled_is_a_new_submission(client, long_sample):
    """A job the key names that was cancelled (here by a cancel; the service cancels a waiting
    call's job for want of a worker, at its timeout, or with the store failing, and tells the
    client to retry) is not answered 409 "cancelled" for the key's whole window: the retry runs."""
    key = f"sync-cancelled-{uuid.uuid4()}"
    audio = long_sample.read_bytes()
    before = newest_job_ids(client)
    answer: list[Any] = []

    def call() -> None:
        answer.append(client.post("/diarize", files={"file": ("c.wav", audio, "audio/wav")},
                                  headers={"Idempotency-Key": key}))

    first = threading.Thread(target=call)
    first.start()
    deadline = time.monotonic() + 30
    while (made := newest_job_ids(client)) == before:
        assert time.monotonic() < deadline, "the call made no job"
        time.sleep(0.05)
    assert client.post(f"/jobs/{made[0]}/cancel").status_code == 200
    first.join(60)
    assert answer and answer[0].status_code == 409 and "cancelled" in answer[0].json()["detail"], answer
    retry = client.post("/diarize", files={"file": ("c.wav", audio, "audio/wav")}, headers={"Idempotency-Key": key})
    assert retry.status_code == 200, retry.text
    assert "idempotent-replayed" not in retry.headers
    rerun = newest_job_ids(client)
    assert rerun != made
    assert client.get(f"/jobs/{rerun[0]}").json()["status"] == "succeeded"
    # ... and that run is what the key names now
    again = client.post("/diarize", files={"file": ("c.wav", audio, "audio/wav")}, headers={"Idempotency-Key": key})
    assert again.status_code == 200 and again.headers.get("idempotent-replayed") == "true"
    assert again.json() == retry.json() and newest_job_ids(client) == rerun


# --- 2. the tenant's quota before a batch's headers -----------------------------------------------

QUOTA_KEY = "gaps-quota-tenant"


@pytest.fixture()
def over_quota(variant_app, settings) -> Iterator[tuple[Any, str]]:
    """An API whose tenant may have two unfinished jobs, on a queue nobody consumes, with one
    queued: a batch of two would take it past its quota. (app, the queued job's id); cancelled after."""
    import redis

    from shared.queue import queue_keys

    queue = f"audio-gaps-{uuid.uuid4().hex[:8]}"
    app = variant_app(queue_name=queue, api_keys=[SecretStr(QUOTA_KEY)], tenant_max_unfinished_jobs=2)
    app.headers["X-API-Key"] = QUOTA_KEY
    r = app.post("/jobs/embedding", files={"file": ("a.wav", tone_wav(), "audio/wav")})
    assert r.status_code == 202, r.text
    yield app, r.json()["job_id"]
    for job in app.get("/jobs", params={"status": "queued", "limit": 100}).json()["jobs"]:
        app.post(f"/jobs/{job['job_id']}/cancel")
    redis.Redis.from_url(settings.redis_url).delete(*queue_keys(queue))


@pytest.fixture()
def header_reads(monkeypatch) -> list[str]:
    """The uploads whose header the API reads (the real check, counted as it runs)."""
    import api.dispatch

    read: list[str] = []
    real = api.dispatch.check_audio_limits

    def counted(stream: Any, *args: Any, **kwargs: Any) -> Any:
        read.append(getattr(stream, "name", "?"))
        return real(stream, *args, **kwargs)

    monkeypatch.setattr(api.dispatch, "check_audio_limits", counted)
    return read


def test_an_over_quota_tenants_batch_is_refused_before_any_header_is_read(over_quota, header_reads):
    """Two files that are not audio (each would be 415 once its header is read): a tenant whose
    quota they would cross is answered 429 and no header is read. It was 415, a header read first."""
    app, _ = over_quota
    files = [("files", (f"{i}.m4a", b"not audio at all, " * 64, "audio/mp4")) for i in range(2)]
    r = app.post("/jobs/batch", data={"kind": "embedding"}, files=files)
    body = _error(r, 429)
    assert "AUDIO_ANALYSIS_TENANT_MAX_UNFINISHED_JOBS" in body["detail"] and r.headers["Retry-After"] == "30"
    assert header_reads == [], f"{len(header_reads)} headers read for a batch refused 429"
    # a batch alone past the limit is 413 as before, also before any header
    one = app.post("/jobs/batch", data={"kind": "embedding"},
                   files=[("files", (f"{i}.wav", tone_wav(), "audio/wav")) for i in range(3)])
    assert _error(one, 413) and header_reads == []


def test_a_batch_retried_with_its_key_is_answered_from_it_even_at_the_quota(variant_app, settings, header_reads):
    """The early check leaves a key already in use to the key: a tenant whose batch filled its
    quota retries it with its key and gets that batch (202, replayed), not a 429; a new batch
    with a new key is refused before its headers are read."""
    import redis

    from shared.queue import queue_keys

    queue = f"audio-gaps-{uuid.uuid4().hex[:8]}"
    app = variant_app(queue_name=queue, api_keys=[SecretStr(QUOTA_KEY)], tenant_max_unfinished_jobs=2)
    app.headers["X-API-Key"] = QUOTA_KEY
    files = [("files", (f"{i}.wav", tone_wav(), "audio/wav")) for i in range(2)]
    key = str(uuid.uuid4())
    try:
        first = app.post("/jobs/batch", data={"kind": "embedding"}, files=files, headers={"Idempotency-Key": key})
        assert first.status_code == 202, first.text
        assert len(header_reads) == 2
        retry = app.post("/jobs/batch", data={"kind": "embedding"}, files=files, headers={"Idempotency-Key": key})
        assert retry.status_code == 202, retry.text
        assert retry.headers.get("idempotent-replayed") == "true"
        assert retry.json()["batch_id"] == first.json()["batch_id"]
        # (a retry is read as a submission is before its key is looked at: its headers too)
        read = len(header_reads)
        fresh = app.post("/jobs/batch", data={"kind": "embedding"}, files=files,
                         headers={"Idempotency-Key": str(uuid.uuid4())})
        _error(fresh, 429)
        assert len(header_reads) == read, "a batch refused 429 had its headers read"
    finally:
        for job in app.get("/jobs", params={"status": "queued", "limit": 100}).json()["jobs"]:
            app.post(f"/jobs/{job['job_id']}/cancel")
        redis.Redis.from_url(settings.redis_url).delete(*queue_keys(queue))


# --- 3. GET /voiceprints?cursor= ------------------------------------------------------------------

VP_A, VP_B = "gaps-vp-a", "gaps-vp-b"


@pytest.fixture(scope="module")
def vp_api(settings) -> Iterator[Any]:
    """The API in-process with two API keys, on the session's Redis under a prefix of its own; no
    worker (voiceprints are imported)."""
    import redis
    from fastapi.testclient import TestClient

    from api.main import create_app

    own = settings.model_copy(update={"redis_key_prefix": "aa-gaps", "queue_name": "audio-gaps",
                                      "webhook_queue_name": "webhooks-gaps",
                                      "api_keys": [SecretStr(VP_A), SecretStr(VP_B)]})
    r = redis.Redis.from_url(own.redis_url)
    for key in r.scan_iter(match="aa-gaps:*", count=1000):
        r.delete(key)
    with TestClient(create_app(own), raise_server_exceptions=False) as client:
        yield client


def _import(app: Any, key: str, count: int, seed: int) -> list[str]:
    from shared.voiceprints import embedding_model

    model = embedding_model(app.app.state.settings)
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(count):
        vector = rng.normal(size=model.dimension)
        r = app.post("/voiceprints/import", data={"label": f"p{seed}.{i}", "model": model.name}, headers={"X-API-Key": key},
                     files={"file": ("v.json", json_embedding_file(vector / np.linalg.norm(vector)), "application/json")})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


def _next_cursor(r: Any) -> str:
    from urllib.parse import parse_qs, urlsplit

    link = r.headers["link"]
    return parse_qs(urlsplit(link[link.index("<") + 1:link.index(">")]).query)["cursor"][0]


def test_voiceprint_cursors_it_did_not_give_are_422(vp_api):
    a_ids = _import(vp_api, VP_A, 5, 1)
    b_ids = _import(vp_api, VP_B, 5, 2)
    a, b = {"X-API-Key": VP_A}, {"X-API-Key": VP_B}
    page = vp_api.get("/voiceprints", params={"limit": 2}, headers=a)
    assert [v["id"] for v in page.json()["voiceprints"]] == a_ids[:2]
    cursor = _next_cursor(page)
    assert [v["id"] for v in vp_api.get("/voiceprints", params={"limit": 2, "cursor": cursor},
                                        headers=a).json()["voiceprints"]] == a_ids[2:4]

    # junk after (or inside) a good cursor: b64decode dropped it, and the page was served
    for junk in (cursor + "!!", cursor + "====", cursor + "%", cursor[:5] + "." + cursor[5:], cursor + " ",
                 cursor + "\u00e9", "\u2603" * 10, "x" * 201, "x" * 5000, "=", "0"):
        r = vp_api.get("/voiceprints", params={"limit": 2, "cursor": junk}, headers=a)
        assert "cursor" in _error(r, 422)["detail"], (junk, r.text)

    # another key's cursor: a place in its listing, not in this key's (B's page was served from
    # A's second voiceprint's time, B's earlier ones skipped without a word)
    r = vp_api.get("/voiceprints", params={"limit": 2, "cursor": cursor}, headers=b)
    assert "cursor" in _error(r, 422)["detail"], r.text
    assert len(vp_api.get("/voiceprints", params={"limit": 100}, headers=b).json()["voiceprints"]) == len(b_ids)

    # the cursor's own voiceprint deleted: the walk goes on where it was
    assert vp_api.delete(f"/voiceprints/{a_ids[1]}", headers=a).status_code == 204
    r = vp_api.get("/voiceprints", params={"limit": 2, "cursor": cursor}, headers=a)
    assert r.status_code == 200 and [v["id"] for v in r.json()["voiceprints"]] == a_ids[2:4]

    # a cursor given before the owner was part of it (score:id) still reads, for this key
    score, vp_id, _ = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split(":")
    old = base64.urlsafe_b64encode(f"{score}:{vp_id}".encode()).decode().rstrip("=")
    r = vp_api.get("/voiceprints", params={"limit": 2, "cursor": old}, headers=a)
    assert r.status_code == 200 and [v["id"] for v in r.json()["voiceprints"]] == a_ids[2:4]

    # limit's edges: in range is served, out of it (or not a number) refused in the documented shape
    assert vp_api.get("/voiceprints", params={"limit": 1000}, headers=a).json()["count"] == 4
    for limit in ("0", "-1", "1001", str(2**70), "1e3", "", "\u0661"):
        _error(vp_api.get("/voiceprints", params={"limit": limit}, headers=a), 422)


# --- 4. Idempotency-Key on enrolment (POST /voiceprints) ------------------------------------------

def test_an_enrolment_retried_with_its_key_stores_one_voiceprint_even_in_a_full_room(variant_app, utterances):
    """POST /voiceprints twice with one key: one enrol job, one voiceprint, answered again with
    the retry marked replayed. The header was ignored: the retry embedded the files again and
    stored a second voiceprint of the person (two ids, two jobs). The first enrolment here takes
    the key's last place; its retry is answered it, not the full room's 409. Without a key each
    enrolment is its own, as before."""
    app = variant_app(api_keys=[SecretStr("enrol-a")], voiceprints_max_per_owner=2)
    app.headers["X-API-Key"] = "enrol-a"
    for vp in app.get("/voiceprints").json()["voiceprints"]:
        app.delete(f"/voiceprints/{vp['id']}")
    files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in utterances["spk1"][:2]]

    def enrol(key: str | None, label: str = "Ann") -> Any:
        return app.post("/voiceprints", files=files, data={"label": label},
                        headers={"Idempotency-Key": key} if key else {})

    plain = enrol(None)  # one place left after it
    assert plain.status_code == 201, plain.text
    key = f"enrol-{uuid.uuid4()}"
    first = enrol(key)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    made = newest_job_ids(app)
    # the voiceprint is its job's: one per enrolment
    assert first.json()["id"] == "vp_" + made[0]

    retry = enrol(key)
    assert retry.status_code == 201, retry.text
    assert retry.headers.get("idempotent-replayed") == "true"
    assert retry.json() == first.json()
    assert retry.headers["location"] == f"/voiceprints/{first.json()['id']}"
    assert newest_job_ids(app) == made, "the retry ran a second enrolment"
    listed = [vp["id"] for vp in app.get("/voiceprints").json()["voiceprints"]]
    assert sorted(listed) == sorted([plain.json()["id"], first.json()["id"]])

    # the key on another enrolment: 422; a new one without a key meets the full room; nothing run
    assert "already used for another request" in _error(enrol(key, label="Bo"), 422)["detail"]
    assert "delete some" in _error(enrol(None, label="Cy"), 409)["detail"]
    assert newest_job_ids(app) == made
    for vp_id in listed:
        assert app.delete(f"/voiceprints/{vp_id}").status_code == 204
