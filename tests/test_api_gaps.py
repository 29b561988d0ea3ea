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

from tests.conftest import api_under_uvicorn, newest_job_ids, tone_wav

ERROR_KEYS = {"detail", "error_type", "timestamp"}


def _error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == ERROR_KEYS, body
    return body


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

    model = embedding_model(app.app.state.settings).name
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(count):
        vector = rng.normal(size=embedding_model(app.app.state.settings).dimension)
        r = app.post("/voiceprints/import", data={"label": f"p{seed}.{i}", "model": model}, headers={"X-API-Key": key},
                     files={"file": ("v.json", json.dumps((vector / np.linalg.norm(vector)).tolist()).encode(),
                                     "application/json")})
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
