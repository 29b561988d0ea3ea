"""HEAD on every GET route, and bounded voiceprint listings, against real processes (the session's
Redis; the API in-process, or under a real uvicorn where the wire matters).

Each test fails on the code before its fix:

* ``HEAD /health`` (and every other FastAPI route: ``/metrics``, ``/``, ``/docs``, ``/jobs``...)
  answered 405, so load balancers and uptime probes that send HEAD saw the API as down;
* ``GET /voiceprints`` listed every voiceprint of the key at once, each read whole, vector
  included: at 10,000 (the most one key keeps) one request took 43 MB out of Redis and 0.6 s of the
  API, and returned 1.9 MB. It now comes a page at a time (``limit``, 100 by default, at most 1,000;
  the next page in the ``Link`` header), each voiceprint read up to its vector; the web page and
  the Python client follow the pages.
* the web page's "Recent jobs" showed a key's first 20 jobs and no way to the rest; and an answer
  for the previous key that arrived after the new key's replaced the new key's list.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

import pytest

from tests.conftest import api_under_uvicorn

KEY = "head-and-paging-key-0123456789"
OTHER = "head-and-paging-other-key-0123456789"


@pytest.fixture(scope="module")
def keyed_api(settings) -> Iterator[Any]:
    """The API in-process with API keys on, on the session's Redis under a key prefix of its own;
    no worker (nothing here runs a job)."""
    import redis
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from api.main import create_app

    own = settings.model_copy(update={"redis_key_prefix": "aa-headpage", "queue_name": "audio-headpage",
                                      "webhook_queue_name": "webhooks-headpage", "api_keys": [SecretStr(KEY), SecretStr(OTHER)]})
    r = redis.Redis.from_url(own.redis_url)
    for key in r.scan_iter(match="aa-headpage:*", count=1000):
        r.delete(key)
    with TestClient(create_app(own), raise_server_exceptions=False) as client:
        client.headers["X-API-Key"] = KEY
        yield client
    for key in r.scan_iter(match="aa-headpage:*", count=1000):
        r.delete(key)
    r.delete("audio-headpage", "webhooks-headpage")


@pytest.fixture(scope="module")
def uvicorn_api(service_env, tmp_path_factory) -> Iterator[str]:
    """The API under a real uvicorn (api.serve) with API keys on; no worker."""
    with api_under_uvicorn(service_env, tmp_path_factory.mktemp("head-api"), [KEY, OTHER]) as base:
        yield base


# --- HEAD answers like GET, without the body ------------------------------------------------------

# every kind of GET route: FastAPI's (ops, the page, the docs, keyed API routes), Starlette's
# (/openapi.json) and the static files mounted under /ui and /docs-assets
GET_ROUTES = ("/health", "/metrics", "/", "/ui/app.js", "/ui/app.css", "/docs", "/redoc", "/openapi.json",
              "/docs-assets/swagger-ui.css", "/jobs", "/voiceprints")


def test_head_answers_every_get_route_as_get_does_without_the_body(keyed_api):
    for path in GET_ROUTES:
        got, head = keyed_api.get(path), keyed_api.head(path)
        assert got.status_code == 200, (path, got.text)
        # it was 405 on every route FastAPI built
        assert head.status_code == 200, (path, head.status_code, head.text)
        assert head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path
        assert int(head.headers["content-length"]) > 0, path
        if path not in ("/health", "/metrics"):  # these two change from one request to the next
            assert head.headers["content-length"] == got.headers["content-length"], path
            assert head.headers.get("content-security-policy") == got.headers.get("content-security-policy"), path


def test_head_is_refused_and_missed_as_get_is_in_the_documented_shape(keyed_api):
    def same(head: Any, got: Any) -> None:
        assert head.status_code == got.status_code, (head.status_code, got.status_code)
        assert head.content == b""
        assert head.headers["content-type"] == got.headers["content-type"] == "application/json"
        assert head.headers["content-length"] == got.headers["content-length"]
        assert set(got.json()) == {"detail", "error_type", "timestamp"}

    # a keyed route without the key: refused, as the GET is
    for path in ("/jobs", "/voiceprints", "/jobs/00000000000000000000000000000000"):
        keyed_api.headers.pop("X-API-Key")
        try:
            head, got = keyed_api.head(path), keyed_api.get(path)
        finally:
            keyed_api.headers["X-API-Key"] = KEY
        assert head.status_code == 401 and head.headers["www-authenticate"] == "X-API-Key", path
        same(head, got)
    # unknown, and a route that only takes POST
    same(keyed_api.head("/no-such-page"), keyed_api.get("/no-such-page"))
    same(keyed_api.head("/jobs/00000000000000000000000000000000"), keyed_api.get("/jobs/00000000000000000000000000000000"))
    head, got = keyed_api.head("/diarize"), keyed_api.get("/diarize")
    assert head.status_code == 405 and head.headers["allow"] == got.headers["allow"] == "POST"
    same(head, got)
    # the request latency metric still says it was a HEAD, on the route it matched
    metrics = keyed_api.get("/metrics").text
    assert 'method="HEAD",route="/health",status="200"' in metrics, \
        [line for line in metrics.splitlines() if 'method="HEAD"' in line]


def test_a_load_balancer_probe_by_head_finds_the_api_up(uvicorn_api):
    import socket
    from urllib.parse import urlsplit

    import httpx

    for path in ("/health", "/", "/docs", "/ui/app.js"):
        r = httpx.head(uvicorn_api + path, timeout=10)
        assert r.status_code == 200, (path, r.status_code)
        assert r.content == b"", path
    assert httpx.head(uvicorn_api + "/jobs", timeout=10).status_code == 401
    assert httpx.head(uvicorn_api + "/jobs", headers={"X-API-Key": KEY}, timeout=10).status_code == 200
    # on the wire: the head and nothing after it (a body would be taken as the next response)
    where = urlsplit(uvicorn_api)
    with socket.create_connection((where.hostname, where.port), timeout=10) as s:
        s.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\nHEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    responses = raw.split(b"HTTP/1.1 ")[1:]
    assert [r[:3] for r in responses] == [b"200", b"200"], raw[:400]
    assert all(r.endswith(b"\r\n\r\n") for r in responses), raw[:2000]


# --- GET /voiceprints: a page at a time, no vectors read -----------------------------------------

INFO_KEYS = {"id", "label", "model", "dimension", "speech_seconds", "files", "narrowband", "created_at"}


def _fill(store: Any, owner: str, count: int) -> list[str]:
    """``count`` voiceprints of ``owner``, stored as the API stores them (random unit vectors)."""
    import numpy as np

    from shared.voiceprints import EMBEDDING_MODELS

    vectors = np.random.default_rng(7).normal(size=(count, 192))
    return [store.create(owner=owner, label=f"Person {i}", model=EMBEDDING_MODELS["embedded"], embedding=v,
                         speech_seconds=12.5, files=2).id for i, v in enumerate(vectors)]


def _next(response: Any) -> dict[str, str] | None:
    from urllib.parse import parse_qs, urlsplit

    following = response.links.get("next", {}).get("url")
    return {k: v[0] for k, v in parse_qs(urlsplit(following).query).items()} if following else None


def test_listing_ten_thousand_voiceprints_comes_in_pages_without_their_vectors(keyed_api):
    import time

    from api.deps import owner_of
    from shared.voiceprints import VoiceprintStore

    store = VoiceprintStore(keyed_api.app.state.dispatcher.voiceprints.redis, "aa-headpage")
    ids = _fill(store, owner_of(KEY), 10_000)  # the most one key may keep
    stored = sum(store.redis.strlen(store._key(i)) for i in ids)
    assert stored > 40_000_000

    def listed(**params: Any) -> tuple[Any, int, float]:
        before = int(store.redis.info("stats")["total_net_output_bytes"])
        started = time.perf_counter()
        r = keyed_api.get("/voiceprints", params=params)
        took = time.perf_counter() - started
        assert r.status_code == 200, r.text
        return r, int(store.redis.info("stats")["total_net_output_bytes"]) - before, took

    first, sent, took = listed()
    largest, sent_largest, took_largest = listed(limit=1000)
    print(f"\n10,000 voiceprints stored ({stored / 1e6:.1f} MB): GET /voiceprints {took:.3f} s, {sent / 1e6:.3f} MB "
          f"out of Redis, {len(first.content) / 1e6:.3f} MB returned; limit=1000: {took_largest:.3f} s, "
          f"{sent_largest / 1e6:.3f} MB, {len(largest.content) / 1e6:.3f} MB")
    # it was every one of them, read whole: 43 MB out of Redis and 1.9 MB returned, in 0.6 s
    assert first.json()["count"] == 100 and [v["id"] for v in first.json()["voiceprints"]] == ids[:100]
    assert sent < 100_000, f"the first page read {sent} bytes"
    assert largest.json()["count"] == 1000 and sent_largest < 1_000_000, sent_largest
    for vp in first.json()["voiceprints"]:
        assert set(vp) == INFO_KEYS, vp
    assert first.json()["voiceprints"][0] == store.get(ids[0], owner_of(KEY)).public()
    # a page past the largest is refused, as any query parameter out of range
    too_many = keyed_api.get("/voiceprints", params={"limit": 1001})
    assert too_many.status_code == 422 and set(too_many.json()) == {"detail", "error_type", "timestamp"}

    # the pages, followed to the end, hold every voiceprint once, oldest first
    seen: list[str] = []
    params: dict[str, Any] | None = {"limit": 1000}
    while params is not None:
        r, sent, _ = listed(**params)
        seen += [v["id"] for v in r.json()["voiceprints"]]
        assert sent < 1_000_000
        params = _next(r)
        assert params is None or params["limit"] == "1000"
    assert seen == ids
    assert r.json()["count"] == 1000 and "link" not in r.headers  # the last page says so


def test_pages_stay_right_while_voiceprints_come_and_go(keyed_api):
    import json

    from api.deps import owner_of
    from shared.voiceprints import VoiceprintStore

    store = VoiceprintStore(keyed_api.app.state.dispatcher.voiceprints.redis, "aa-headpage")
    owner = owner_of(OTHER)
    ids = _fill(store, owner, 12)
    index = store._index(owner)
    # three stored in the same instant (the index orders them by id), the first page ending on one
    store.redis.zadd(index, {i: float(store.redis.zscore(index, ids[3])) for i in ids[4:6]})
    order = sorted(ids, key=lambda i: (float(store.redis.zscore(index, i)), i))
    # ... and one stored by an earlier version, its vector in the middle of the record: read whole
    legacy = store.get(ids[7], owner)
    store.redis.set(store._key(ids[7]), legacy.model_dump_json())
    headers = {"X-API-Key": OTHER}

    r = keyed_api.get("/voiceprints", params={"limit": 4}, headers=headers)
    assert [v["id"] for v in r.json()["voiceprints"]] == order[:4]
    # the last one listed is deleted, and one listed before it: nothing is skipped or repeated
    assert keyed_api.delete(f"/voiceprints/{order[3]}", headers=headers).status_code == 204
    assert keyed_api.delete(f"/voiceprints/{order[0]}", headers=headers).status_code == 204
    seen = [v["id"] for v in r.json()["voiceprints"]]
    listed = r.json()["voiceprints"]
    while (params := _next(r)) is not None:
        r = keyed_api.get("/voiceprints", params=params, headers=headers)
        assert r.status_code == 200, r.text
        listed += r.json()["voiceprints"]
        seen += [v["id"] for v in r.json()["voiceprints"]]
    assert seen == order
    assert next(v for v in listed if v["id"] == ids[7]) == legacy.public()
    # another key lists its own alone
    assert not set(ids) & {v["id"] for v in keyed_api.get("/voiceprints", params={"limit": 1000}).json()["voiceprints"]}
    # a cursor this API did not give is refused in the documented shape
    for cursor in ("nonsense", "bm90OmEgY3Vyc29y", json.dumps({"a": 1}), "x" * 201):
        bad = keyed_api.get("/voiceprints", params={"cursor": cursor}, headers=headers)
        assert bad.status_code == 422 and "cursor" in bad.json()["detail"], (cursor, bad.text)
        assert set(bad.json()) == {"detail", "error_type", "timestamp"}


@pytest.fixture(scope="module")
def listed_voiceprints(uvicorn_api, settings) -> Iterator[list[str]]:
    """230 voiceprints of KEY in the uvicorn API's store (three pages of 100), deleted after."""
    from api.deps import owner_of
    from shared.voiceprints import VoiceprintStore

    store = VoiceprintStore.from_settings(settings)
    ids = _fill(store, owner_of(KEY), 230)
    yield ids
    for i in ids:
        store.delete(i, owner_of(KEY))


def test_the_python_client_follows_the_pages(uvicorn_api, listed_voiceprints):
    from cli.client import Client

    with Client(uvicorn_api, api_key=KEY) as client:
        # it returned the first page alone once the listing was paged
        assert [v["id"] for v in client.voiceprints(page_size=100)] == listed_voiceprints
        assert [v["id"] for v in client.voiceprints()] == listed_voiceprints


def test_the_web_page_lists_a_page_and_shows_more_on_demand(uvicorn_api, listed_voiceprints):
    base, ids = uvicorn_api, listed_voiceprints

    rows = "() => document.querySelectorAll('#voiceprints tbody tr[data-voiceprint-id]').length"
    with _chromium() as browser:
        page = browser.new_page()
        page.goto(base + "/")
        _type_key(page, KEY, f"() => ({rows})() === 100")
        assert page.is_visible("#vp-more")
        page.click("#vp-more")
        page.wait_for_function(f"() => ({rows})() === 200")
        page.click("#vp-more")
        page.wait_for_function(f"() => ({rows})() === 230")
        assert not page.is_visible("#vp-more")
        shown = page.eval_on_selector_all("#voiceprints tbody tr[data-voiceprint-id]",
                                          "trs => trs.map(tr => tr.dataset.voiceprintId)")
        assert shown == ids


# --- the web page's recent jobs -------------------------------------------------------------------

@contextlib.contextmanager
def _chromium() -> Iterator[Any]:
    """Debian's chromium, headless, under playwright (skipped where it is not installed)."""
    from tests.test_web import CHROMIUM

    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (scripts/dev.sh test installs it as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
            "--disable-background-networking", "--disable-component-update"])
        try:
            yield browser
        finally:
            browser.close()


def _type_key(page: Any, key: str, wait_for: str) -> None:
    """The key typed and the field left (the page's one "change" of it, which lists the first
    pages), then ``wait_for`` (a function's source: a bare expression would go through eval,
    which the page's policy refuses)."""
    page.fill("#api-key", key)
    page.locator("#api-key").blur()
    page.wait_for_function(wait_for)


@pytest.fixture(scope="module")
def listed_jobs(uvicorn_api, settings) -> Iterator[dict[str, list[str]]]:
    """45 job records of KEY and 3 of OTHER in the uvicorn API's store, as submits write them
    (nothing runs them: no worker sends to this API's queue), newest first; deleted after."""
    import time

    from api.deps import owner_of
    from shared.jobs import JobRecord, JobStore, new_job_id

    store = JobStore.from_settings(settings)
    made: dict[str, list[str]] = {KEY: [], OTHER: []}
    for key, count in ((KEY, 45), (OTHER, 3)):
        for i in range(count):
            record = store.create(JobRecord(job_id=new_job_id(), kind="diarize", owner=owner_of(key),
                                            filename=f"{'other' if key == OTHER else 'mine'}-{i}.wav"))
            made[key].insert(0, record.job_id)
            time.sleep(0.002)  # the listing is by creation time: one per tick keeps the order exact
    yield made
    for job_ids in made.values():
        store.redis.delete(*(store._job_key(j) for j in job_ids))
        for owner in (owner_of(KEY), owner_of(OTHER)):
            store.redis.zrem(store._owner_index(owner), *job_ids)
        store.redis.zrem(store.key("jobs"), *job_ids)


RECENT = "() => Array.from(document.querySelectorAll('#recent tbody tr[data-job-id]')).map(tr => tr.dataset.jobId)"


def test_the_web_pages_recent_jobs_show_a_page_and_more_on_demand(uvicorn_api, listed_jobs):
    mine = listed_jobs[KEY]
    with _chromium() as browser:
        page = browser.new_page()
        page.goto(uvicorn_api + "/")
        _type_key(page, KEY, f"() => ({RECENT})().length === 20")
        assert page.evaluate(RECENT) == mine[:20]
        assert page.is_visible("#recent-more")
        page.click("#recent-more")
        page.wait_for_function(f"() => ({RECENT})().length === 40")
        page.click("#recent-more")
        page.wait_for_function(f"() => ({RECENT})().length === 45")
        assert page.evaluate(RECENT) == mine
        assert not page.is_visible("#recent-more")
        # refresh starts over at the first page
        page.click("#refresh")
        page.wait_for_function(f"() => ({RECENT})().length === 20")


def test_a_late_answer_for_the_previous_key_does_not_replace_the_new_keys_jobs(uvicorn_api, listed_jobs):
    held = []

    def route(r) -> None:
        # the first key's listing is held back until the second key's has been shown
        if r.request.headers.get("x-api-key") == KEY:
            held.append(r)
        else:
            r.continue_()

    with _chromium() as browser:
        page = browser.new_page()
        page.route("**/jobs?*", route)
        page.goto(uvicorn_api + "/")
        _type_key(page, KEY, "() => true")
        _type_key(page, OTHER, f"() => ({RECENT})().length === 3")
        assert len(held) == 1
        with page.expect_response(lambda response: response.request.headers.get("x-api-key") == KEY):
            held[0].continue_()
        page.wait_for_timeout(1000)  # the late answer's JSON read and handled
        assert page.evaluate(RECENT) == listed_jobs[OTHER]
        assert not page.is_visible("#recent-more")


def test_the_web_page_draws_a_days_timeline_of_two_hundred_thousand_turns(uvicorn_api, settings):
    """A day's recording can have hundreds of thousands of turns. The page spread them into one
    Math.max call, past the most arguments a call may take: "Maximum call stack size exceeded",
    and "show" drew nothing. Now the turns in view are drawn (the dense ones in view as merged
    bars that say how many turns they hold: api/web/app.js drawTurns), not one element per turn."""
    from api.deps import owner_of
    from shared.jobs import JobRecord, JobStore, new_job_id

    turns = 200_000
    segments = [{"start": round(i * 0.4, 3), "end": round(i * 0.4 + 0.3, 3), "speaker": f"SPEAKER_{i % 5:02d}"}
                for i in range(turns)]
    result = {"diarization_results": segments, "processing_time": 1.0, "audio_duration": turns * 0.4,
              "segments_count": turns, "model_device": "cpu"}
    store = JobStore.from_settings(settings)
    record = store.create(JobRecord(job_id=new_job_id(), kind="diarize", owner=owner_of(KEY), filename="day.wav"))
    store.redis.set(store._job_key(record.job_id), record.model_copy(
        update={"status": "succeeded", "result": result, "progress": 1.0}).to_json(), ex=600)
    try:
        with _chromium() as browser:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(uvicorn_api + "/")
            _type_key(page, KEY, f"() => document.querySelector(\"#recent tr[data-job-id='{record.job_id}']\")")
            page.locator(f"#recent tr[data-job-id='{record.job_id}'] button", has_text="show").click()
            page.wait_for_function("() => document.querySelector('#summary').textContent.includes('200000 turns')",
                                   timeout=60_000)
            assert errors == []
            assert page.locator("#timeline .lane").count() == 5
            bars = page.locator("#timeline .turn").count()
            held = page.evaluate("() => [...document.querySelectorAll('#timeline .turn')]"
                                 ".reduce((n, el) => n + Number(el.dataset.turns || 1), 0)")
            assert 0 < bars < 20_000 and bars <= held <= turns
            assert page.text_content("#summary").startswith(f"5 speakers, {turns} turns, {turns * 0.4:.1f} s")
    finally:
        store.redis.delete(store._job_key(record.job_id))
        store.redis.zrem(store._owner_index(owner_of(KEY)), record.job_id)
        store.redis.zrem(store.key("jobs"), record.job_id)
