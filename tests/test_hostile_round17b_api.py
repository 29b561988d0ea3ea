"""Round 17, second part: what a client sent that the API answered from the request's headers
alone, but answered late or misleadingly. Each test fails on the code before its fix:

* a request refused from its headers alone (a page of another site: 403; a host name the API
  does not answer to: 400; a compressed body: 415) was answered at once but the connection was
  kept, so the client went on sending the whole body (a browser does: hundreds of MB on a home
  uplink) before it could read the answer, and uvicorn read all of it to keep the connection.
  Each now closes the connection with its answer, as the 413 of a declared length (1928b76) and
  the 401 (ce42b28) do;
* the 413 of a body over the upload limit said the limit in bytes only ("larger than the limit
  of 1073741824 bytes"): it says it as a person reads it too, "(1 GiB)", after the figure in
  bytes that a client may parse, which is unchanged;
* a ``file_url`` (or ``webhook_url``) longer than its limit was told "must be an absolute http(s)
  URL", though it was one: it is told it is too long, and the limit;
* a compare job cancelled while its worker read its first file's header had its uploads removed
  at once (as a cancel does), and the worker, finding the second file gone, logged an ERROR
  blaming the service's storage ("the API and the workers must share one storage"), though the
  job stayed "cancelled": it logs, at INFO, that the cancelled job's files were removed;
* a tenant at its quota of unfinished jobs was refused 429 only once its whole upload had been
  received (and spooled): it is refused from the request's headers, and the connection closed.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import tone_wav

from tests.test_hostile_round17_api import _uvicorn_api


@pytest.fixture(scope="module")
def open_api(service_env, settings, tmp_path_factory) -> Iterator[tuple[str, Any, Any]]:
    """The API under uvicorn on loopback, without keys (so its Host check is on)."""
    with _uvicorn_api(service_env, settings, tmp_path_factory, "r17b",
                      {"AUDIO_ANALYSIS_MAX_UPLOAD_BYTES": str(1 << 30)}) as api:
        yield api


UPLOAD = 1_000_000_000  # the Content-Length declared: a 1 GB recording


def _refused_early(base: str, head_lines: str, first: bytes = b"", upload: int = UPLOAD) -> tuple[bytes, bytes, int]:
    """A POST /jobs/diarize of a 1 GB body with the request head's ``head_lines``, sent as a
    client sends it, 1 MB at a time, whatever the server answers meanwhile, until the body is
    sent or the server closes the connection: (the answer's head, lower case; its body; the
    bytes of the body sent)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall((f"POST /jobs/diarize HTTP/1.1\r\n{head_lines}"
                  f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {upload}\r\n\r\n").encode())
    sent = 0

    def send_body() -> None:
        nonlocal sent
        chunk = first + bytes((1 << 20) - len(first))
        try:
            while sent < upload:
                n = min(len(chunk), upload - sent)
                sock.sendall(chunk[:n])
                sent += n
                chunk = bytes(1 << 20)
        except OSError:
            pass  # the server closed the connection

    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    sock.settimeout(60)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    sender.join(60)
    sock.close()
    head, _, body = got.partition(b"\r\n\r\n")
    return head.lower(), body, sent


PART = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'


@pytest.mark.parametrize("extra, status", [
    ("Sec-Fetch-Site: cross-site\r\n", b" 403 "),  # a page of another site
    ("Origin: https://elsewhere.example\r\n", b" 403 "),  # the same, from a browser without Sec-Fetch-Site
    ("Content-Encoding: gzip\r\n", b" 415 "),
])
def test_a_refusal_from_the_headers_closes_the_connection(open_api, extra, status) -> None:
    """Before: each was answered at once, and then all of the 1 GB body was taken in (sent in
    full, 1,000,000,000 bytes). Now its answer says ``Connection: close`` and the server closes
    the connection after it: less than a tenth of the body is ever sent (what the sockets'
    buffers hold)."""
    base, _, _ = open_api
    host = base.removeprefix("http://")
    head, body, sent = _refused_early(base, f"Host: {host}\r\n{extra}", PART)
    assert status in head.split(b"\r\n", 1)[0], head
    assert b"\r\nconnection: close" in head, head
    assert b'"detail"' in body and b'"error_type"' in body
    assert sent < UPLOAD // 10, sent


def test_the_host_checks_refusal_closes_the_connection(open_api) -> None:
    """A name the API does not answer to (a rebound DNS name) sending an upload: before, 400
    and the whole 1 GB taken in; now 400, ``Connection: close``, and less than a tenth sent."""
    base, _, _ = open_api
    port = base.rsplit(":", 1)[1]
    head, _, sent = _refused_early(base, f"Host: attacker.example:{port}\r\n", PART)
    assert b" 400 " in head.split(b"\r\n", 1)[0], head
    assert b"\r\nconnection: close" in head, head
    assert sent < UPLOAD // 10, sent


@pytest.mark.parametrize("content_type, size, said", [
    ("multipart/form-data; boundary=b", 2 << 30,
     "request body is larger than the limit of 1073741824 bytes (1 GiB)"),
    ("application/x-www-form-urlencoded", 2 << 20,
     "a form without files (application/x-www-form-urlencoded) is larger than 1048576 bytes (1 MiB); "
     "send uploads as multipart/form-data"),
])
def test_the_413_says_the_limit_as_a_person_reads_it(open_api, content_type, size, said) -> None:
    """Before: "request body is larger than the limit of 1073741824 bytes". Now the same, and
    "(1 GiB)"; the error's shape (detail, error_type, timestamp) is as documented."""
    base, _, _ = open_api
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall((f"POST /jobs/diarize HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
                      f"Content-Length: {size}\r\n\r\n").encode())
        sock.settimeout(15)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), head
    error = json.loads(body)
    assert set(error) == {"detail", "error_type", "timestamp"}, error
    assert error["detail"] == said, error["detail"]
    assert error["error_type"] == "ValidationError"


@pytest.mark.parametrize("field, limit", [("file_url", 8192), ("webhook_url", 2048)])
def test_a_url_too_long_is_told_so(open_api, field, limit) -> None:
    """Before: 422 "file_url must be an absolute http(s) URL" for an absolute https URL of
    9,000 characters. Now 422 saying it is too long and what the limit is; one character
    shorter than the limit is not refused for its length."""
    base, _, _ = open_api
    long = "https://bucket.example.com/m.wav?X-Amz-Signature=" + "a" * (limit + 1)
    form = {"file_url": "https://bucket.example.com/m.wav", field: long}
    r = httpx.post(f"{base}/jobs/diarize", data=form, timeout=30)
    assert r.status_code == 422, r.text
    assert set(r.json()) == {"detail", "error_type", "timestamp"}
    assert r.json()["detail"] == (f"{field} is {len(long)} characters long, longer than the limit of {limit}: give "
                                  "a shorter URL (a presigned URL with fewer parameters, a shortened link)"), r.json()
    fits = long[:limit]
    r = httpx.post(f"{base}/jobs/diarize", data={**form, field: fits}, timeout=30)
    assert "characters long" not in r.text and "absolute" not in r.text, r.text


@pytest.fixture(scope="module")
def held_probe(settings, tmp_path_factory):
    """A private Redis, the API in-process, and one real worker (tests/_held_probe_worker.py)
    whose first job holds in its first file's header check until ``release`` exists."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from cli.launcher import Stack, free_port
    from tests.test_reliability import PrivateStack

    base = tmp_path_factory.mktemp("held-probe")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    changes = {"redis_url": url, "storage_dir": base / "uploads", "queue_name": "audio-held-probe"}
    env = {
        "REDIS_URL": url, "AUDIO_ANALYSIS_REDIS_URL": url, "AUDIO_ANALYSIS_STORAGE_DIR": str(changes["storage_dir"]),
        "AUDIO_ANALYSIS_QUEUE_NAME": "audio-held-probe",
        "HELD_PROBE_MARKER": str(base / "held"), "HELD_PROBE_RELEASE": str(base / "release"),
    }
    p = PrivateStack(base, settings.model_copy(update=changes), env, port, Stack(log_dir=base),
                     worker_module="tests._held_probe_worker")
    try:
        p.start_redis()
        with TestClient(create_app(p.settings), raise_server_exceptions=False) as client:
            p.client = client
            yield p
    finally:
        p.stack.stop()


def test_a_cancelled_compare_is_logged_as_cancelled_not_as_a_storage_fault(held_probe) -> None:
    """Before: the worker logged "ERROR ... job J: its upload J/file2... is not in this worker's
    storage ... the API and the workers must share one storage" for a job its client had
    cancelled. Now: "INFO ... job J cancelled while it started: its files were removed", no
    ERROR, and the job ends "cancelled", its files gone."""
    p = held_probe
    p.worker("w1")
    r = p.client.post("/jobs/compare", files={"file1": ("alice.wav", tone_wav(1.0), "audio/wav"),
                                              "file2": ("unknown.wav", tone_wav(1.0), "audio/wav")})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    marker = p.base / "held"
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline, f"the worker never reached the header check: {p.log('w1')[-2000:]}"
        time.sleep(0.05)
    r = p.client.post(f"/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    (p.base / "release").write_text("go")
    deadline = time.monotonic() + 60
    while f"job {job_id} cancelled while it started" not in p.log("w1") \
            and "must share one storage" not in p.log("w1"):
        assert time.monotonic() < deadline, p.log("w1")[-3000:]
        time.sleep(0.1)
    log = p.log("w1")
    assert "must share one storage" not in log, log[-3000:]
    said = next(line for line in log.splitlines() if f"job {job_id} cancelled while it started" in line)
    assert '"level": "INFO"' in said and "its files were removed" in said, said
    assert not [line for line in log.splitlines() if '"level": "ERROR"' in line or "ERROR/" in line], log[-3000:]
    assert p.client.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    assert not (p.base / "uploads" / job_id).exists()


def test_a_tenant_at_its_jobs_quota_is_refused_before_its_upload_is_sent(service_env, settings,
                                                                        tmp_path_factory) -> None:
    """A tenant allowed 1 unfinished job, with one queued (no worker takes it), sends another
    of 200 MB. Before: all 200 MB were received and spooled, then refused (this body, never
    finished, as a 400). Now: 429 with Retry-After and ``Connection: close`` from the headers,
    less than a tenth of the body sent. A retry whose Idempotency-Key names the queued job is
    still answered from its key (202), not refused by the job it holds."""
    with _uvicorn_api(service_env, settings, tmp_path_factory, "r17bq",
                      {"AUDIO_ANALYSIS_TENANT_MAX_UNFINISHED_JOBS": "1"}) as (base, _, _):
        first = {"file": ("a.wav", tone_wav(0.5), "audio/wav")}
        r = httpx.post(f"{base}/jobs/diarize", files=first, headers={"Idempotency-Key": "r17b-first"}, timeout=30)
        assert r.status_code == 202, r.text
        host = base.removeprefix("http://")
        head, body, sent = _refused_early(base, f"Host: {host}\r\n", PART, upload=200_000_000)
        assert b" 429 " in head.split(b"\r\n", 1)[0], head
        assert b"\r\nconnection: close" in head and b"\r\nretry-after: 30" in head, head
        assert json.loads(body)["detail"].startswith("the service has 1 job queued or running"), body
        assert sent < 20_000_000, sent
        again = httpx.post(f"{base}/jobs/diarize", files=first, headers={"Idempotency-Key": "r17b-first"}, timeout=30)
        assert again.status_code == 202 and again.json()["job_id"] == r.json()["job_id"], again.text
