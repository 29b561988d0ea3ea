"""A sixth round at the API's HTTP edge, against a real uvicorn (``python -m api.serve``, its own
h11 protocol class) on the session's Redis, with queues nobody consumes: what a client sends
below the routes, where the framework's defaults answered.

Each test fails on the code before its fix:

* a request h11 cannot parse (a malformed request line or header, two different Content-Lengths,
  a transfer coding other than chunked, no Host, a broken chunk in the middle of a body, a head
  of 2 MB) was answered by uvicorn itself, ``400 text/plain`` "Invalid HTTP request received.":
  the one error a client could not read in the documented shape, and a 2 MB head was a 400
  rather than 431;
* a request with both ``Transfer-Encoding: chunked`` and ``Content-Length`` was read as chunked
  and its connection kept open: the request a proxy going by Content-Length would have taken for
  the next body was served as a request of its own (request smuggling);
* a gzip-compressed body (``Content-Encoding: gzip``) was parsed as its compressed bytes and
  answered "Invalid multipart data" (400), not 415 with the encoding the API takes;
* a form without files (``application/x-www-form-urlencoded``) was taken up to the upload limit
  and parsed byte by byte in Python: 20 MB of ``&`` held the API's core 7 s for a 422, and the
  1 GiB limit allowed six minutes a request;
* a browser that sends no ``Sec-Fetch-Site`` (Safari before 16.4, a privacy proxy stripping it)
  let a page of another site import a voiceprint and queue jobs: its ``Origin`` went unread;
* a voiceprint label of nothing visible (zero-width spaces, a BOM) was stored and shown as an
  empty name; an imported file's ``"files": true`` or ``-5`` was stored as 1 and -5 recordings.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from typing import Any, Iterator

import pytest

from tests.conftest import tone_wav

ERROR_KEYS = {"detail", "error_type", "timestamp"}
KEY = "round6-key-0123456789"
PREFIX = "aa-round6"
QUEUE, WEBHOOK_QUEUE = "audio-round6", "webhooks-round6"  # nobody consumes them: jobs stay queued


@pytest.fixture(scope="module")
def api(service_env, settings, tmp_path_factory) -> Iterator[Any]:
    """The API under a real uvicorn (api.serve) with an API key, in keys and queues of its own:
    an httpx client with the key, ``.port`` its port."""
    from urllib.parse import urlsplit

    import httpx
    import redis

    from tests.conftest import api_under_uvicorn

    env = {"AUDIO_ANALYSIS_REDIS_KEY_PREFIX": PREFIX, "AUDIO_ANALYSIS_QUEUE_NAME": QUEUE,
           "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": WEBHOOK_QUEUE,
           "AUDIO_ANALYSIS_STORAGE_DIR": str(tmp_path_factory.mktemp("round6-uploads"))}
    r = redis.Redis.from_url(settings.redis_url)
    try:
        with api_under_uvicorn(service_env, tmp_path_factory.mktemp("round6-api"), [KEY], env) as base, \
                httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=30) as client:
            client.port = urlsplit(base).port  # type: ignore[attr-defined]
            yield client
    finally:
        for key in r.scan_iter(match=f"{PREFIX}:*", count=1000):
            r.delete(key)
        r.delete(QUEUE, WEBHOOK_QUEUE)


def _exchange(port: int, request: bytes, timeout_s: float = 5.0) -> tuple[list[tuple[int, dict[str, str], bytes]], bool]:
    """Send ``request`` as it is; every response that comes back (status, headers, body) and
    whether the server closed the connection (rather than leaving it open past ``timeout_s``)."""
    data, closed = b"", False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass  # the server may refuse before the whole request is in
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                data += chunk
        except socket.timeout:
            pass
        except ConnectionResetError:
            closed = True
    responses = []
    while data.startswith(b"HTTP/1.1 "):
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        responses.append((int(lines[0].split(" ")[1]), headers, rest[:length]))
        data = rest[length:]
    return responses, closed


def _assert_documented(response: tuple[int, dict[str, str], bytes], status: int) -> dict[str, Any]:
    code, headers, body = response
    assert code == status, (code, headers, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), (headers, body[:300])
    parsed = json.loads(body)
    assert set(parsed) == ERROR_KEYS and parsed["error_type"] == "ValidationError", parsed
    return parsed


MODEL = "3d-speaker/campplus-cn-en-common"
VECTOR = ("v.json", b"[" + b"0.1," * 191 + b"0.1]", "application/json")
HOST = b"Host: 127.0.0.1\r\nX-API-Key: " + KEY.encode() + b"\r\n"
FORM = b'--x\r\nContent-Disposition: form-data; name="num_speakers"\r\n\r\n2\r\n--x--\r\n'
MULTIPART = b"Content-Type: multipart/form-data; boundary=x\r\n"

UNPARSABLE = {
    "two different Content-Lengths": b"POST /jobs/diarize HTTP/1.1\r\n" + HOST + MULTIPART
    + b"Content-Length: %d\r\nContent-Length: 5\r\n\r\n" % len(FORM) + FORM,
    "a signed Content-Length": b"POST /jobs/diarize HTTP/1.1\r\n" + HOST + MULTIPART
    + b"Content-Length: +%d\r\n\r\n" % len(FORM) + FORM,
    "a transfer coding besides chunked": b"POST /jobs/diarize HTTP/1.1\r\n" + HOST + MULTIPART
    + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "a NUL in a header": b"GET /jobs HTTP/1.1\r\n" + HOST + b"X-Note: a\x00b\r\n\r\n",
    "a space before a header's colon": b"GET /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key : " + KEY.encode() + b"\r\n\r\n",
    "no Host": b"GET /jobs HTTP/1.1\r\nX-API-Key: " + KEY.encode() + b"\r\n\r\n",
    "two Hosts": b"GET /jobs HTTP/1.1\r\n" + HOST + b"Host: elsewhere\r\n\r\n",
    "a request line of HTTP/0.9": b"GET /jobs\r\n\r\n",
    "a byte outside ASCII in the target": b"GET /jobs/\xff\xfe HTTP/1.1\r\n" + HOST + b"\r\n",
    "a broken chunk in the middle of a form": b"POST /jobs/diarize HTTP/1.1\r\n" + HOST + MULTIPART
    + b"Transfer-Encoding: chunked\r\n\r\n5\r\n--x\r\n\r\nZZZZ\r\n",
}


@pytest.mark.parametrize("what", list(UNPARSABLE))
def test_a_request_the_server_cannot_parse_is_refused_in_the_documented_shape(api, what):
    responses, closed = _exchange(api.port, UNPARSABLE[what])
    assert len(responses) == 1, responses
    body = _assert_documented(responses[0], 400)
    assert body["detail"].startswith("invalid HTTP request"), body
    assert KEY not in body["detail"] and "\\x" not in body["detail"], body  # what was sent is not quoted back
    assert responses[0][1].get("x-content-type-options") == "nosniff"
    assert closed  # nothing more can be read on such a connection


def test_a_request_head_over_the_limit_is_a_431_in_the_documented_shape(api):
    responses, _ = _exchange(api.port, b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 2_000_000 + b"\r\n\r\n")
    assert len(responses) == 1, responses
    _assert_documented(responses[0], 431)
    assert api.get("/health").status_code in (200, 503)  # and the API serves on


def test_a_body_framed_two_ways_is_refused_and_nothing_after_it_is_served(api):
    """Content-Length says the body is empty and what follows is the next request; chunked
    framing says the body ends at its last chunk. The API refuses the request and closes the
    connection: the request hidden after it is never served."""
    hidden = b"GET /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + KEY.encode() + b"\r\n\r\n"
    request = (b"POST /jobs/nope/cancel HTTP/1.1\r\n" + HOST + b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"0\r\n\r\n" + hidden)
    responses, closed = _exchange(api.port, request)
    assert len(responses) == 1, [(code, body[:100]) for code, _, body in responses]
    _assert_documented(responses[0], 400)
    assert responses[0][1].get("connection") == "close"
    assert closed
    # the same with Content-Length covering the chunked body, on an upload route
    request = (b"POST /jobs/diarize HTTP/1.1\r\n" + HOST + MULTIPART + b"Content-Length: 3\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(FORM) + FORM + b"\r\n0\r\n\r\n" + hidden)
    responses, closed = _exchange(api.port, request)
    assert len(responses) == 1 and closed, [(code, body[:100]) for code, _, body in responses]
    _assert_documented(responses[0], 400)


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate", "identity, gzip"])
def test_a_compressed_body_is_refused_as_such_and_never_inflated(api, encoding):
    bomb = gzip.compress(b"\0" * 20_000_000)  # 20 KB that would inflate to 20 MB
    r = api.post("/jobs/diarize", content=bomb, headers={"Content-Type": "multipart/form-data; boundary=x",
                                                         "Content-Encoding": encoding})
    assert r.status_code == 415, (r.status_code, r.text)
    assert set(r.json()) == ERROR_KEYS and "Content-Encoding" in r.json()["detail"]
    assert r.headers["accept-encoding"] == "identity"


def test_an_identity_encoded_upload_and_a_body_less_request_still_pass(api):
    r = api.post("/jobs/embedding", files={"file": ("a.wav", tone_wav(), "audio/wav")},
                 headers={"Content-Encoding": "identity"})
    assert r.status_code == 202, r.text
    assert api.get("/jobs", headers={"Content-Encoding": "gzip"}).status_code == 200


@pytest.mark.parametrize("how", ["declared", "chunked", "behind a second Content-Type"])
def test_a_form_without_files_is_held_to_what_such_a_form_needs(api, how):
    body = b"&" * 3_000_000
    headers = [("X-API-Key", KEY), ("Content-Type", "application/x-www-form-urlencoded")]
    if how == "behind a second Content-Type":  # the parser reads the first; the limit must too
        headers.append(("Content-Type", "multipart/form-data; boundary=x"))
    content: Any = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if how == "chunked" else body
    started = time.monotonic()
    r = api.post("/jobs/diarize", content=content, headers=headers)
    assert r.status_code == 413, (r.status_code, r.text[:200])
    assert set(r.json()) == ERROR_KEYS and "x-www-form-urlencoded" in r.json()["detail"]
    assert time.monotonic() - started < 2
    # a form that gives its audio by URL still comes this way
    r = api.post("/jobs/diarize", data={"file_url": "https://93.184.215.14/a.wav", "num_speakers": "2"})
    assert r.status_code == 202, r.text


@pytest.mark.parametrize("origin", ["http://evil.example", "http://127.0.0.1:1", "null", "http://evil.example:{port}"])
def test_a_page_of_another_origin_is_refused_by_its_origin_where_the_browser_sends_no_fetch_metadata(api, origin):
    headers = {"Origin": origin.format(port=api.port)}
    r = api.post("/voiceprints/import", headers=headers, files={"file": VECTOR}, data={"label": "Mallory", "model": MODEL})
    assert r.status_code == 403 and set(r.json()) == ERROR_KEYS, (r.status_code, r.text)
    r = api.post("/jobs/embedding", headers=headers, files={"file": ("a.wav", tone_wav(), "audio/wav")})
    assert r.status_code == 403, r.text
    assert "Mallory" not in {vp["label"] for vp in api.get("/voiceprints").json()["voiceprints"]}
    # the page of this very origin, and clients that send no Origin, go on as before
    for same in ({"Origin": f"http://127.0.0.1:{api.port}"}, {}):
        r = api.post("/voiceprints/import", headers=same, files={"file": VECTOR}, data={"label": "Alice", "model": MODEL})
        assert r.status_code == 201, r.text
        assert api.delete(f"/voiceprints/{r.json()['id']}", headers=same).status_code == 204


# --- voiceprints: what a label and an imported file may claim -------------------------------------

@pytest.mark.parametrize("label", ["\u200b\u200b", "\ufeff", "\u0301", "\u200d \u2060"],
                         ids=["zero-width-spaces", "bom", "lone-combining-mark", "joiner-and-word-joiner"])
def test_a_label_with_nothing_visible_is_refused_at_enrolment_and_import(api, label):
    """Such a voiceprint was stored (201), listed as an empty cell on the page and written as a
    blank cue into subtitles: a speaker named, and nobody able to read the name."""
    r = api.post("/voiceprints/import", files={"file": VECTOR}, data={"label": label, "model": MODEL})
    assert r.status_code == 422 and set(r.json()) == ERROR_KEYS, (r.status_code, r.text)
    assert "visible" in r.json()["detail"]
    document = json.dumps({"label": label, "model": MODEL, "dimension": 192, "embedding": [0.1] * 192})
    r = api.post("/voiceprints/import", files={"file": ("v.json", document, "application/json")})
    assert r.status_code == 422, r.text
    # enrolment says so before any worker is asked (none consumes this API's queue)
    r = api.post("/voiceprints", files=[("files", ("a.wav", tone_wav(), "audio/wav"))], data={"label": label})
    assert r.status_code == 422 and "label" in r.json()["detail"], r.text
    assert api.get("/voiceprints").json()["count"] == 0


@pytest.mark.parametrize(("claimed", "stored"), [(True, None), (-5, None), (0, None), (3, 3)])
def test_an_imported_files_count_is_a_count_or_nothing(api, claimed, stored):
    document = json.dumps({"label": "Ann", "model": MODEL, "dimension": 192, "embedding": [0.1] * 192,
                           "files": claimed})
    r = api.post("/voiceprints/import", files={"file": ("v.json", document, "application/json")})
    assert r.status_code == 201, r.text
    try:
        assert r.json()["files"] == stored and api.get(f"/voiceprints/{r.json()['id']}").json()["files"] == stored
    finally:
        assert api.delete(f"/voiceprints/{r.json()['id']}").status_code == 204
