"""HEAD on every GET route, and bounded voiceprint listings, against real processes (the session's
Redis; the API in-process, or under a real uvicorn where the wire matters).

Each test fails on the code before its fix:

* ``HEAD /health`` (and every other FastAPI route: ``/metrics``, ``/``, ``/docs``, ``/jobs``...)
  answered 405, so load balancers and uptime probes that send HEAD saw the API as down;
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import pytest

KEY = "head-and-paging-key-0123456789"


@pytest.fixture(scope="module")
def keyed_api(settings) -> Iterator[Any]:
    """The API in-process with API keys on, on the session's Redis under a key prefix of its own;
    no worker (nothing here runs a job)."""
    import redis
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from api.main import create_app

    own = settings.model_copy(update={"redis_key_prefix": "aa-headpage", "queue_name": "audio-headpage",
                                      "webhook_queue_name": "webhooks-headpage", "api_keys": [SecretStr(KEY)]})
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
    import httpx

    from cli.launcher import Stack, free_port, wait_until

    env = {k: v for k, v in service_env.items() if not k.startswith("_")}
    env["AUDIO_ANALYSIS_API_KEYS"] = json.dumps([KEY])
    stack = Stack(env={**os.environ, **env}, log_dir=tmp_path_factory.mktemp("head-api"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        proc = stack.start_api("127.0.0.1", port)
        wait_until(lambda: httpx.get(f"{base}/health", timeout=2).status_code == 200, 60, "api", proc)
        yield base
    finally:
        stack.stop()


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
