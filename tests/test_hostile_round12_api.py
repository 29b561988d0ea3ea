"""A twelfth round of what a hostile client tried against the API, after the earlier rounds
(tests/test_hostile_*.py, test_security.py, test_tenant_quota.py, test_idempotency.py), against a
real uvicorn (``python -m api.serve``) on the session's Redis, with queues nobody consumes.

Each test fails on the code before its fix:

* the web page at ``/`` is served under a Content-Security-Policy (this origin's scripts only,
  no other host to connect to), but the same page was also served as ``/ui/index.html`` (and
  ``/ui/index.html/``) without any: a link to it ran the page with none of the policy's limits;
"""

from __future__ import annotations

from typing import Any, Iterator

import psutil
import pytest

ERROR_KEYS = {"detail", "error_type", "timestamp"}
KEY = "round12-key-0123456789"
PREFIX = "aa-round12"
QUEUE, WEBHOOK_QUEUE = "audio-round12", "webhooks-round12"  # nobody consumes them: jobs stay queued


@pytest.fixture(scope="module")
def redis_client(settings) -> Iterator[Any]:
    import redis

    r = redis.Redis.from_url(settings.redis_url)
    yield r
    for key in r.scan_iter(match=f"{PREFIX}:*", count=1000):
        r.delete(key)
    r.delete(QUEUE, WEBHOOK_QUEUE)


@pytest.fixture(scope="module")
def api(service_env, settings, redis_client, tmp_path_factory) -> Iterator[Any]:
    """The API under a real uvicorn (api.serve) with an API key, in keys and queues of its own:
    an httpx client with the key, and the server's process (``client.server``)."""
    import httpx

    from tests.conftest import api_under_uvicorn

    env = {"AUDIO_ANALYSIS_REDIS_KEY_PREFIX": PREFIX, "AUDIO_ANALYSIS_QUEUE_NAME": QUEUE,
           "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": WEBHOOK_QUEUE,
           "AUDIO_ANALYSIS_STORAGE_DIR": str(tmp_path_factory.mktemp("round12-uploads"))}
    with api_under_uvicorn(service_env, tmp_path_factory.mktemp("round12-api"), [KEY], env) as base, \
            httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=60) as client:
        port = base.rsplit(":", 1)[1]
        client.server = next(p for p in psutil.Process().children(recursive=True)  # type: ignore[attr-defined]
                             if "api.serve" in " ".join(p.cmdline()) and port in p.cmdline())
        yield client


def _assert_documented(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ERROR_KEYS, body
    return body


# --- the page's policy, wherever the page is served ----------------------------------------------
@pytest.mark.parametrize("path", ["/ui/index.html", "/ui/index.html/"])
def test_the_page_served_as_a_file_keeps_its_content_security_policy(api, path: str) -> None:
    page = api.get("/")
    assert page.status_code == 200
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    same = api.get(path)
    assert same.status_code == 200 and same.content == page.content  # the page itself
    assert same.headers.get("Content-Security-Policy") == policy
    # the page's own files keep working under it, and the docs' assets keep theirs
    assert api.get("/ui/app.js").status_code == 200
    assert api.get("/docs-assets/swagger-ui.css").status_code == 200
