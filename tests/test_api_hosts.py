"""The host names the API answers to (api/hosts.py), against DNS rebinding, over a real uvicorn
(``python -m api.serve``, as ``up``, compose and Kubernetes run it) and the session's Redis.

Before the check, an API on 127.0.0.1 without API keys (``audio-analysis up``, the default)
answered a request whatever its ``Host``: a page on another site whose name its owner had
re-pointed at 127.0.0.1 read ``/jobs``, results and voiceprints from the user's browser as its
own origin (``Host: attacker.example:8000``; ``Sec-Fetch-Site`` says same-origin then). Now such a
request is a 400 in the documented error shape, where the API listens on loopback without keys
or where names are listed; an API on 0.0.0.0 (compose, Kubernetes, a load balancer), one with
keys and one told ``["*"]`` answer any host, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Iterator

import pytest

ERROR_KEYS = {"detail", "error_type", "timestamp"}
ATTACKER = "attacker.example:8000"
# the routes a rebound page was after, and the open ones
READS = ("/jobs", "/voiceprints", "/jobs/0123456789abcdef0123456789abcdef", "/health", "/")


@contextlib.contextmanager
def _served(service_env: dict, log_dir: Any, bind: str = "127.0.0.1", **extra: str) -> Iterator[Any]:
    """``python -m api.serve --host <bind>`` with ``extra`` in its environment, no API keys unless
    given, on queues nobody consumes: an httpx client for it, reached at 127.0.0.1."""
    import httpx

    from cli.launcher import Stack, free_port
    from tests.conftest import wait_for_api

    env = {**os.environ, **{k: v for k, v in service_env.items() if not k.startswith("_")},
           "AUDIO_ANALYSIS_API_KEYS": "[]", "AUDIO_ANALYSIS_ALLOWED_HOSTS": "[]",
           "AUDIO_ANALYSIS_QUEUE_NAME": "audio-hosts", "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": "webhooks-hosts",
           **extra}
    env.pop("AUDIO_ANALYSIS_API_HOST", None)  # the server's --host says where it listens
    stack = Stack(env=env, log_dir=log_dir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_api(base, stack.spawn("api", [sys.executable, "-m", "api.serve", "--host", bind, "--port", str(port)]))
        with httpx.Client(base_url=base, timeout=30) as client:
            client.port = port  # type: ignore[attr-defined]
            yield client
    finally:
        stack.stop()
        log = log_dir / "api.log"
        if log.exists():
            print(log.read_text(errors="replace")[-1500:])


def _refused(r: Any, host: str) -> None:
    assert r.status_code == 400, (host, r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == ERROR_KEYS, body
    assert body["error_type"] == "ValidationError" and "AUDIO_ANALYSIS_ALLOWED_HOSTS" in body["detail"], body
    assert r.headers["content-type"] == "application/json"
    assert r.headers.get("x-request-id") and r.headers.get("x-content-type-options") == "nosniff"


def _answered(r: Any, host: str) -> None:
    # answered as the API answers: the route's own status, never the Host refusal
    assert r.status_code in (200, 404), (host, r.status_code, r.text[:300])
    assert "ALLOWED_HOSTS" not in r.text, (host, r.text[:300])


@pytest.fixture(scope="module")
def loopback_api(service_env, tmp_path_factory) -> Iterator[Any]:
    """As ``up`` runs it: on 127.0.0.1, no API keys, nothing listed."""
    with _served(service_env, tmp_path_factory.mktemp("hosts-loopback")) as client:
        yield client


def test_a_rebound_name_reads_nothing_from_an_api_on_loopback(loopback_api):
    for path in READS:
        _refused(loopback_api.get(path, headers={"Host": ATTACKER}), ATTACKER)
    # nor changes anything (the cross-site POST guard sees a rebound page as same-origin)
    r = loopback_api.post("/voiceprints", headers={"Host": ATTACKER, "Sec-Fetch-Site": "same-origin"},
                          files={"files": ("a.wav", b"RIFF", "audio/wav")}, data={"label": "Mallory"})
    _refused(r, ATTACKER)
    r = loopback_api.head("/jobs", headers={"Host": ATTACKER})
    assert r.status_code == 400 and r.content == b"", (r.status_code, r.content)
    # any other name, its port or case or a final dot changed, and what is not a host at all
    for host in ("attacker.example", "ATTACKER.example:80", "attacker.example.", "evil.localhost.example:8000",
                 "localhost.attacker.example", "attacker.example@127.0.0.1", "127.0.0.1.nip.io:8000", "",
                 "[::1", "a b"):
        _refused(loopback_api.get("/jobs", headers={"Host": host}), host)


def test_loopback_names_and_addresses_are_answered(loopback_api):
    port = loopback_api.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost", "LOCALHOST.", "127.0.0.1",
                 # an address is never a rebound name: a browser sends one only to that address
                 f"192.168.1.20:{port}", "[2001:db8::1]"):
        for path in READS:
            _answered(loopback_api.get(path, headers={"Host": host}), host)
    assert loopback_api.get("/jobs").status_code == 200  # httpx's own Host, 127.0.0.1:<port>


def test_listed_names_are_answered_and_only_those(service_env, tmp_path_factory):
    hosts = json.dumps(["api.example.com", "*.corp.example", "Speakers.Example:9000"])
    with _served(service_env, tmp_path_factory.mktemp("hosts-listed"), AUDIO_ANALYSIS_ALLOWED_HOSTS=hosts) as api:
        for host in ("api.example.com", "api.example.com:8000", "eu.corp.example:443", "a.b.corp.example",
                     "speakers.example", f"localhost:{api.port}", f"127.0.0.1:{api.port}"):
            _answered(api.get("/jobs", headers={"Host": host}), host)
        for host in (ATTACKER, "corp.example", "xcorp.example", "example.com", "api.example.com.attacker.example"):
            _refused(api.get("/jobs", headers={"Host": host}), host)


@pytest.mark.parametrize("how", ["bound to 0.0.0.0", "allowed hosts *", "with API keys"])
def test_any_host_is_answered_where_the_check_would_only_break_deployments(service_env, tmp_path_factory, how):
    """An API on 0.0.0.0 is reached as ``api:8000`` or a public name (compose, Kubernetes, a load
    balancer), here over loopback as a proxy beside it would; one with keys has nothing a page
    without the key could read; ``["*"]`` is the operator's own word."""
    bind, extra, headers = "127.0.0.1", {}, {}
    if how == "bound to 0.0.0.0":
        bind = "0.0.0.0"
    elif how == "allowed hosts *":
        extra = {"AUDIO_ANALYSIS_ALLOWED_HOSTS": '["*"]'}
    else:
        extra, headers = {"AUDIO_ANALYSIS_API_KEYS": '["hosts-key-0123456789"]'}, {"X-API-Key": "hosts-key-0123456789"}
    with _served(service_env, tmp_path_factory.mktemp("hosts-any"), bind, **extra) as api:
        for host in (ATTACKER, "api:8000", "audio-analysis.example.com", f"127.0.0.1:{api.port}"):
            r = api.get("/jobs", headers={"Host": host, **headers})
            assert r.status_code == 200, (how, host, r.status_code, r.text[:300])


def test_the_hosts_as_the_check_reads_them():
    from api.hosts import host_of, is_loopback

    assert host_of("127.0.0.1:8000") == "127.0.0.1"
    assert host_of("[::1]:8000") == "::1"
    assert host_of("LocalHost.:80") == "localhost"
    assert host_of("api.example.com") == "api.example.com"
    for junk in ("", "a b", "x@y", "[::1", "host:port", "a/b"):
        assert host_of(junk) is None, junk
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", None, "10.0.0.1", "testserver", "api"))
