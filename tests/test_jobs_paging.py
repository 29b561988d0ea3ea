"""GET /jobs a page at a time, against the session's Redis (the API in-process, API keys on, no
worker: the jobs are written through JobStore, as the API writes them).

Each test fails on the code before paging: ``limit`` was silently cut to
``AUDIO_ANALYSIS_JOBS_LIST_LIMIT`` (100) and nothing named a next page, so a key with 250 jobs could
list its newest 100 and never the rest; a filter's page looked through the newest 1,000 jobs and no
further, so a match older than those was never found. The cut stays (clients send limit=1000), but
the body says the limit that applied, and ``next_cursor`` and the ``Link`` header name the rest.
"""

from __future__ import annotations

import base64
import re
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

KEY = "jobs-paging-key-0123456789"
OTHER = "jobs-paging-other-key-0123456789"
LIVE = "jobs-paging-live-key-0123456789"
FILTERED = "jobs-paging-filtered-key-0123456789"
SPARSE = "jobs-paging-sparse-key-0123456789"
ADMIN = "jobs-paging-admin-key-0123456789"
PREFIX = "aa-jobpage"
ERROR_KEYS = {"detail", "error_type", "timestamp"}
LINK = re.compile(r'^<(http://testserver/jobs\?[^>]+)>; rel="next"$')


@pytest.fixture(scope="module")
def api(settings) -> Iterator[Any]:
    """The API with API keys on (and an admin key), on the session's Redis under a key prefix of
    its own; the store the jobs are written through."""
    import redis
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from api.main import create_app
    from shared.jobs import JobStore

    own = settings.model_copy(update={
        "redis_key_prefix": PREFIX, "queue_name": "audio-jobpage", "webhook_queue_name": "webhooks-jobpage",
        "api_keys": [SecretStr(k) for k in (KEY, OTHER, LIVE, FILTERED, SPARSE)],
        "admin_api_keys": [SecretStr(ADMIN)],
    })
    r = redis.Redis.from_url(own.redis_url)

    def clean() -> None:
        for key in r.scan_iter(match=f"{PREFIX}:*", count=1000):
            r.delete(key)
        r.delete("audio-jobpage", "webhooks-jobpage")

    clean()
    with TestClient(create_app(own), raise_server_exceptions=False) as client:
        yield client, JobStore(redis.Redis.from_url(own.redis_url, decode_responses=True), own)
    clean()


def make(store: Any, key: str, count: int, kind: Any = "embedding", status: Any = None) -> list[Any]:
    """``count`` jobs of ``key``'s tenant, created one after the other (newest last); ``kind`` and
    ``status`` a value or a function of the job's number."""
    from api.deps import owner_of
    from shared.jobs import QUEUED, JobRecord, new_job_id

    made = []
    for i in range(count):
        record = store.create(JobRecord(job_id=new_job_id(), kind=kind(i) if callable(kind) else kind,
                                        owner=owner_of(key), filename=f"call-{i}.wav"))
        wanted = status(i) if callable(status) else status
        if wanted not in (None, QUEUED):
            record = store.update(record.job_id, lambda r, s=wanted: r.model_copy(update={"status": s}))
        made.append(record)
    return made


def newest_first(records: list[Any]) -> list[str]:
    # the index's order: score (the creation time), ties by id, both descending
    return [r.job_id for r in sorted(records, key=lambda r: (r.created_ts, r.job_id), reverse=True)]


def get(client: Any, key: str, url: str) -> Any:
    r = client.get(url, headers={"X-API-Key": key})
    assert r.status_code == 200, (url, r.status_code, r.text)
    return r


def follow(client: Any, key: str, response: Any) -> Any | None:
    """The next page, as a client would reach it: the Link header, which must name the body's cursor."""
    body = response.json()
    link = response.headers.get("link")
    if body["next_cursor"] is None:
        assert link is None, link
        return None
    found = LINK.match(link or "")
    assert found, link
    assert parse_qs(urlsplit(found.group(1)).query)["cursor"] == [body["next_cursor"]]
    return get(client, key, found.group(1))


def walk(client: Any, key: str, url: str) -> list[list[str]]:
    pages: list[list[str]] = []
    response: Any = get(client, key, url)
    while response is not None:
        body = response.json()
        assert body["count"] == len(body["jobs"])
        pages.append([j["job_id"] for j in body["jobs"]])
        assert len(pages) < 50, "the walk does not end"
        response = follow(client, key, response)
    return pages


def flat(pages: list[list[str]]) -> list[str]:
    return [job_id for page in pages for job_id in page]


def test_250_jobs_come_in_pages_of_100_each_once_newest_first_and_only_the_keys_own(api):
    client, store = api
    mine, theirs = [], []
    for _ in range(5):  # interleaved: the other tenant's jobs sit between ours in the global index
        mine += make(store, KEY, 50, kind=lambda i: "diarize" if i % 3 else "embedding")
        theirs += make(store, OTHER, 8)

    first = get(client, KEY, "/jobs?limit=100")
    assert LINK.match(first.headers["link"]) and "limit=100" in first.headers["link"]
    pages = walk(client, KEY, "/jobs?limit=100")
    assert [len(p) for p in pages] == [100, 100, 50]
    assert flat(pages) == newest_first(mine)  # each exactly once, newest first
    # a listing entry is a summary, as before: the existing fields stay
    job = first.json()["jobs"][0]
    assert job["job_id"] == newest_first(mine)[0] and job["status_url"].endswith(f"/jobs/{job['job_id']}")
    assert "result" not in job

    # another key sees its own jobs alone, and a cursor from our walk shows it none of ours
    assert flat(walk(client, OTHER, "/jobs?limit=100")) == newest_first(theirs)
    cursor = first.json()["next_cursor"]
    seen = get(client, OTHER, f"/jobs?limit=100&cursor={cursor}").json()["jobs"]
    assert {j["job_id"] for j in seen} <= {r.job_id for r in theirs}
    # an admin key: everyone's, each once
    everyone = flat(walk(client, ADMIN, "/jobs?limit=100"))
    assert set(newest_first(mine + theirs)) <= set(everyone) and len(everyone) == len(set(everyone))
    assert [j for j in everyone if j in {r.job_id for r in mine + theirs}] == newest_first(mine + theirs)

    # the default page is still 20, and the body keeps its fields (plus next_cursor)
    body = get(client, KEY, "/jobs").json()
    assert body["count"] == 20 and body["limit"] == 20 and set(body) == {"jobs", "count", "limit", "next_cursor"}
    # past the maximum (100), cut as before, but said, and the rest is a page away
    page = get(client, KEY, "/jobs?limit=1000")
    assert page.json()["limit"] == 100 and page.json()["count"] == 100 and "limit=100&" in page.headers["link"]
    assert flat(walk(client, KEY, "/jobs?limit=1000")) == newest_first(mine)


def test_jobs_submitted_or_expired_between_two_pages_do_not_shift_the_walk(api):
    client, store = api
    old = make(store, LIVE, 250)
    expected = newest_first(old)

    page = get(client, LIVE, "/jobs?limit=100")
    got = [j["job_id"] for j in page.json()["jobs"]]
    new = make(store, LIVE, 30)  # submitted meanwhile: newer than the cursor, not in this walk
    page = follow(client, LIVE, page)
    got += [j["job_id"] for j in page.json()["jobs"]]
    new += make(store, LIVE, 30)
    # the job the cursor names expires, with its index entry (the index is trimmed at its old end)
    gone = got[-1]
    store.redis.delete(store._job_key(gone))
    store.redis.zrem(store._owner_index(old[0].owner), gone)
    page = follow(client, LIVE, page)
    got += [j["job_id"] for j in page.json()["jobs"]]
    assert follow(client, LIVE, page) is None
    assert got == expected

    # a new walk starts with the newer ones
    assert flat(walk(client, LIVE, "/jobs?limit=100"))[:60] == newest_first(new)


def test_status_and_kind_filters_hold_across_pages(api):
    client, store = api
    made = make(store, FILTERED, 250, kind=lambda i: "embedding" if i % 2 == 0 else "diarize",
                status=lambda i: {0: "succeeded", 1: "failed"}.get(i % 5, "queued"))

    def expected(**want: str) -> list[str]:
        return newest_first([r for r in made if all(getattr(r, k) == v for k, v in want.items())])

    pages = walk(client, FILTERED, "/jobs?limit=20&status=succeeded")
    assert [len(p) for p in pages] == [20, 20, 10] and flat(pages) == expected(status="succeeded")
    pages = walk(client, FILTERED, "/jobs?limit=100&kind=diarize")
    assert [len(p) for p in pages] == [100, 25] and flat(pages) == expected(kind="diarize")
    pages = walk(client, FILTERED, "/jobs?limit=10&status=failed&kind=embedding")
    assert flat(pages) == expected(status="failed", kind="embedding") and len(flat(pages)) == 25
    # the Link keeps the filters
    link = get(client, FILTERED, "/jobs?limit=10&status=failed&kind=embedding").headers["link"]
    query = parse_qs(urlsplit(LINK.match(link).group(1)).query)
    assert query["status"] == ["failed"] and query["kind"] == ["embedding"] and query["limit"] == ["10"]


def test_a_filtered_page_reads_a_bounded_stretch_and_says_where_to_go_on(api):
    client, store = api
    # 2,300 embeddings with 3 diarizations among them: the newest, one past the first 1,000
    # jobs a filtered page looks through, and the oldest
    made = make(store, SPARSE, 1, kind="diarize")
    made += make(store, SPARSE, 1000, kind="embedding")
    made += make(store, SPARSE, 1, kind="diarize")
    made += make(store, SPARSE, 1300, kind="embedding")
    made += make(store, SPARSE, 1, kind="diarize")
    diarizations = newest_first([r for r in made if r.kind == "diarize"])

    first = get(client, SPARSE, "/jobs?limit=10&kind=diarize").json()
    # one match within the first 1,000 jobs: a short page, and a cursor to go on from
    assert [j["job_id"] for j in first["jobs"]] == diarizations[:1] and first["next_cursor"]
    pages = walk(client, SPARSE, "/jobs?limit=10&kind=diarize")
    assert flat(pages) == diarizations and len(pages) == 3  # 1,000 + 1,000 + 303 jobs looked through
    # a filter that matches nothing: empty pages, each with where to go on, never the whole index at once
    pages = walk(client, SPARSE, "/jobs?limit=10&status=running")
    assert pages == [[], [], []]


def test_a_bad_cursor_is_a_422_in_the_documented_shape(api):
    client, store = api
    job_id = make(store, KEY, 1)[0].job_id

    def b64(text: bytes) -> str:
        return base64.urlsafe_b64encode(text).decode().rstrip("=")

    cursors = [
        "not a cursor", "%%%", "AAAA", b64(b"hello"),
        b64(f"inf:{job_id}".encode()), b64(f"nan:{job_id}".encode()), b64(f"-1.5:{job_id}".encode()),
        b64(f"1.5:{job_id.upper()}".encode()), b64(f"1.5:{job_id}x".encode()), b64(b"1.5:" + b"\xff" * 32),
        b64(f"1.5:{job_id}".encode()) + "!", b64(f"1.5:vp_{job_id}".encode()),
    ]
    for cursor in cursors:
        r = client.get("/jobs", params={"cursor": cursor}, headers={"X-API-Key": KEY})
        assert r.status_code == 422 and set(r.json()) == ERROR_KEYS, (cursor, r.status_code, r.text)
        assert r.json()["error_type"] == "ValidationError" and r.json()["detail"].startswith("cursor"), r.text
    r = client.get("/jobs", params={"cursor": "A" * 201}, headers={"X-API-Key": KEY})
    assert r.status_code == 422 and set(r.json()) == ERROR_KEYS, r.text
    # given twice: refused as any single-valued parameter is, not read as its last value
    r = client.get(f"/jobs?cursor={b64(f'1.5:{job_id}'.encode())}&cursor=x", headers={"X-API-Key": KEY})
    assert r.status_code == 422 and r.json()["detail"] == "cursor: given 2 times; send each query parameter once"
    # a well-formed cursor is a place in the listing: any place is fine
    assert get(client, KEY, f"/jobs?cursor={b64(f'1.5:{job_id}'.encode())}").json()["jobs"] == []

    # a limit out of range
    for limit in ("1001", "0", "-1", "x"):
        r = client.get(f"/jobs?limit={limit}", headers={"X-API-Key": KEY})
        assert r.status_code == 422 and set(r.json()) == ERROR_KEYS and "limit" in r.json()["detail"], (limit, r.text)
    # without a key, nothing
    assert client.get("/jobs").status_code == 401

    # the OpenAPI document names the cursor, the body's next_cursor and the Link header
    spec = client.get("/openapi.json").json()
    listing = spec["paths"]["/jobs"]["get"]
    assert {"limit", "status", "kind", "cursor"} <= {p["name"] for p in listing["parameters"]}
    assert "Link" in listing["responses"]["200"]["headers"]
    assert "next_cursor" in spec["components"]["schemas"]["JobPage"]["properties"]
