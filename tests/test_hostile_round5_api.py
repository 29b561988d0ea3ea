"""A fifth round at the API's HTTP edge, against real processes: the API under a real uvicorn
(api.serve, some under prlimit or with a tmpfs for its temporary files), the session's Redis
(straight or through a proxy that slows or stalls it), an S3-speaking server (moto's, on
127.0.0.1) behind a proxy that makes the bucket slow or failing, as a real one sometimes is.

Each test fails on the code before its fix:

* a cancel deleted the job's upload from the bucket on the API's event loop: while a slow bucket
  answered, every other request of every client (``/health`` included) waited, 5.6 s of a frozen
  API for a bucket 3 s slow per call;
* a bucket that failed to delete turned a cancel that had happened into a 500, its webhook never
  sent, and a refused upload (415) into a 500, in the clean-up of what it had not stored;
* a multipart body cut short (no closing boundary: a Content-Length smaller than the body, a
  client or proxy that stopped) lost its unfinished last part silently: ``file`` then
  ``num_speakers=3`` ran with the default speaker count (202);
* a synchronous call whose job succeeded between the API's last read and its cancel at the
  deadline was answered 504, and the client, told of no job, ran it again;
* a batch held all its files to one duration budget: three 2 s jobs under a 3 s limit were
  refused 413 as "6 s together";
* 48 uploads on their way into a slow bucket held all 40 threads of the shared pool: a status
  poll waited 2.3 s for a thread;
* each waiting synchronous call polled its record every 50 ms for up to an hour (200 of them: 38 %
  of the API's core); past 100 polls at once redis-py's pool refused the rest, 503 for calls
  whose queued jobs then ran for nobody, and nothing cancelled a job whose call got a 503;
* a full disk under the form's temporary files, or no file handle left, was 400 "There was an
  error parsing the body" (the client's mistake); the API kept a soft open-files limit of 1024
  under a hard one of 8192;
* an ``Upgrade: websocket`` request was answered 403 with an empty body, whatever the path;
* a job record the store lost during a synchronous call was 404 ValidationError;
* the OpenAPI document named neither 400, 408 nor 507;
* a bucket refusing to store an upload (503 past botocore's retries) was a 500;
* without API keys (the default), a page of another site made the user's browser import a
  voiceprint labelled as it pleased (201), queue jobs and cancel them: a multipart POST needs
  no preflight.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from tests.conftest import tone_wav

ERROR_KEYS = {"detail", "error_type", "timestamp"}
KEY = "round5-key-0123456789"
BUCKET = "round5-uploads"
PREFIX = "aa-round5"
QUEUE, WEBHOOK_QUEUE = "audio-round5", "webhooks-round5"  # nobody consumes them: jobs stay queued


def _assert_error(r, status: int) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert set(r.json()) == ERROR_KEYS, r.text


# --- a bucket that can be slow or fail ----------------------------------------------------------


class BucketProxy:
    """Forwards every request to moto's S3 server; a request that deletes (the listing a job's
    deletion starts with, DeleteObjects, DeleteObject) first waits ``delay_s``, or is answered
    ``failure`` when ``failing``: 503 SlowDown by default (botocore retries it, then gives up),
    or an error botocore gives up on at once (403: a bucket whose policy refuses the deletion),
    which reaches the caller as the same ClientError without 10-30 s of retries' backoff."""

    def __init__(self, upstream_port: int) -> None:
        self.delay_s = 0.0
        self.put_delay_s = 0.0  # each object stored (a slow or far bucket, a big upload)
        self.failing = False
        self.failure = (503, "SlowDown")
        self.failing_puts = False  # storing an upload answered 503 (after botocore's retries)
        self.deletes = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                deleting = self.command == "DELETE" or "list-type=" in self.path or \
                    (self.command == "POST" and "delete" in self.path.split("?", 1)[-1])
                if self.command == "PUT" and proxy.failing_puts and "/uploads/" in self.path:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if deleting:
                    proxy.deletes += 1
                    if proxy.failing:
                        status, code = proxy.failure
                        payload = f"<Error><Code>{code}</Code><Message>try later</Message></Error>".encode()
                        self.send_response(status)
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                    time.sleep(proxy.delay_s)
                elif self.command == "PUT":
                    time.sleep(proxy.put_delay_s)
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def bucket() -> Iterator[BucketProxy]:
    from moto.server import ThreadedMotoServer

    from cli.launcher import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test").create_bucket(Bucket=BUCKET)
    proxy = BucketProxy(port)
    try:
        yield proxy
    finally:
        proxy.close()
        server.stop()


@contextlib.contextmanager
def _uvicorn_api(service_env: dict, settings: Any, log_dir: Any, prefix: tuple[str, ...] = (), **extra: str) -> Iterator[Any]:
    """The API under a real uvicorn (api.serve) with an API key, on queues nobody consumes and a
    key prefix of its own on the session's Redis: an httpx client with the key, ``.proc`` its
    process, ``.port`` its port."""
    import httpx
    import redis

    from cli.launcher import Stack, free_port
    from tests.conftest import wait_for_api

    env = {**{k: v for k, v in service_env.items() if not k.startswith("_")}, **os.environ,
           "AUDIO_ANALYSIS_API_KEYS": json.dumps([KEY]), "AUDIO_ANALYSIS_REDIS_KEY_PREFIX": PREFIX,
           "AUDIO_ANALYSIS_QUEUE_NAME": QUEUE, "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": WEBHOOK_QUEUE,
           "AUDIO_ANALYSIS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES": "true",
           # synchronous calls wait for a worker to come (as with workers that scale from zero)
           "AUDIO_ANALYSIS_SYNC_REQUIRES_LIVE_WORKER": "false", **extra}
    r = redis.Redis.from_url(settings.redis_url)
    stack = Stack(env=env, log_dir=log_dir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        if prefix:  # the server started through another command (prlimit)
            import sys

            proc = stack.spawn("api", [*prefix, sys.executable, "-m", "api.serve", "--host", "127.0.0.1", "--port", str(port)])
        else:
            proc = stack.start_api("127.0.0.1", port)
        wait_for_api(base, proc)
        with httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=120) as client:
            client.proc, client.port = proc, port  # type: ignore[attr-defined]
            yield client
    finally:
        stack.stop()
        for key in r.scan_iter(match=f"{PREFIX}:*", count=1000):
            r.delete(key)
        r.delete(QUEUE, WEBHOOK_QUEUE)


@pytest.fixture(scope="module")
def s3_api(service_env, settings, bucket, tmp_path_factory) -> Iterator[Any]:
    """The API under a real uvicorn, its uploads in the bucket behind the proxy."""
    with _uvicorn_api(service_env, settings, tmp_path_factory.mktemp("round5-s3-api"),
                      AUDIO_ANALYSIS_STORAGE_BACKEND="s3", AUDIO_ANALYSIS_S3_BUCKET=BUCKET,
                      AUDIO_ANALYSIS_S3_ENDPOINT_URL=bucket.url, AUDIO_ANALYSIS_S3_REGION="us-east-1",
                      AUDIO_ANALYSIS_S3_ADDRESSING_STYLE="path", AWS_ACCESS_KEY_ID="test",
                      AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1") as client:
        yield client


@pytest.fixture(scope="module")
def api(service_env, settings, tmp_path_factory) -> Iterator[Any]:
    """The API under a real uvicorn, uploads on the local disk."""
    with _uvicorn_api(service_env, settings, tmp_path_factory.mktemp("round5-api"),
                      AUDIO_ANALYSIS_STORAGE_DIR=str(tmp_path_factory.mktemp("round5-uploads"))) as client:
        yield client


def _objects(bucket_proxy: BucketProxy, prefix: str = "") -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=bucket_proxy.url, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def test_a_slow_bucket_never_freezes_the_api_during_a_cancel(s3_api, bucket):
    r = s3_api.post("/jobs/embedding", files={"file": ("a.wav", tone_wav(), "audio/wav")})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert any(job_id in k for k in _objects(bucket)), "the upload is in the bucket"

    bucket.delay_s = 3.0
    answered: dict[str, Any] = {}
    try:
        cancelling = threading.Thread(target=lambda: answered.update(r=s3_api.post(f"/jobs/{job_id}/cancel")))
        cancelling.start()
        time.sleep(0.5)  # the cancel is waiting on the bucket now
        slowest = 0.0
        while cancelling.is_alive():
            started = time.monotonic()
            assert s3_api.get("/health").status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.1)
        cancelling.join()
    finally:
        bucket.delay_s = 0.0
    print(f"\nslowest /health while a cancel waited 3 s per call on the bucket: {slowest:.2f} s")
    assert answered["r"].status_code == 200, answered["r"].text
    assert answered["r"].json()["status"] == "cancelled"
    # the event loop held for the bucket's whole answer: 3 s and more, per call
    assert slowest < 1.0, f"the API stood still {slowest:.1f} s while one cancel talked to the bucket"
    assert not any(job_id in k for k in _objects(bucket)), "the upload was still deleted"


def test_a_failing_bucket_neither_fails_a_cancel_nor_loses_its_webhook(s3_api, bucket, settings):
    import redis

    r = s3_api.post("/jobs/embedding", files={"file": ("a.wav", tone_wav(), "audio/wav")},
                    data={"webhook_url": "http://127.0.0.1:8080/hook"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    broker = redis.Redis.from_url(settings.redis_url)
    webhooks_before = broker.llen(WEBHOOK_QUEUE)

    # refused outright: a 503 past botocore's retries is the same ClientError to the API, only
    # after 10-30 s of backoff (standard mode, 5 attempts)
    bucket.failing, bucket.failure = True, (403, "AccessDenied")
    try:
        answered = s3_api.post(f"/jobs/{job_id}/cancel")
    finally:
        bucket.failing, bucket.failure = False, (503, "SlowDown")
    # the cancel happened (the record says so, the worker drops the job): the client is told so,
    # not "internal server error" for a clean-up the workers' sweep does anyway
    assert answered.status_code == 200, answered.text
    assert answered.json()["status"] == "cancelled"
    assert s3_api.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    # and the webhook that says so is on its way
    assert broker.llen(WEBHOOK_QUEUE) == webhooks_before + 1, "the cancelled job's webhook was never sent"
    assert s3_api.post(f"/jobs/{job_id}/cancel").status_code == 409


def test_a_cancels_webhook_is_owed_from_the_moment_of_the_cancel(api, settings):
    """The cancel records the job's end and then queues its webhook: an API process that died in
    between left the delivery unsent for good (a worker's end of a job has owed its delivery in
    the same transaction since round 5's life-cycle fixes). The cancel's delivery is now owed
    with the cancel: its due time is in Redis while the delivery waits in a queue nobody takes,
    and the workers' recovery pass sends what passes its due time (test_hostile_round5_lifecycle)."""
    from shared.jobs import JobStore

    r = api.post("/jobs/embedding", files={"file": ("a.wav", tone_wav(), "audio/wav")},
                 data={"webhook_url": "http://127.0.0.1:8080/hook"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    store = JobStore.from_settings(settings.model_copy(update={"redis_key_prefix": PREFIX}))
    assert store.webhook_due_at(job_id) is None
    assert api.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert store.webhook_due_at(job_id) is not None, "the cancel's webhook is not owed"


def _with_rate(wav: bytes, rate: int) -> bytes:
    """The same PCM WAV with another sample rate in its (44-byte) header."""
    import struct

    return wav[:24] + struct.pack("<II", rate, rate * 2) + wav[32:]


@pytest.mark.parametrize("what", ["empty", "1 Hz"])
def test_a_refused_upload_is_its_4xx_while_the_bucket_fails(s3_api, bucket, what):
    body = b"" if what == "empty" else _with_rate(tone_wav(), 1)
    bucket.failing = True
    try:
        r = s3_api.post("/jobs/embedding", files={"file": ("x.wav", body, "audio/wav")})
    finally:
        bucket.failing = False
    # refused before a byte was stored: nothing to clean up, and no bucket to blame
    _assert_error(r, 415)


# --- a multipart body cut short is refused, not run without its last part -----------------------


def _form(parts: list[tuple[str, str | None, bytes]], boundary: str = "BB") -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def _job_ids(api) -> set[str]:
    return {j["job_id"] for j in api.get("/jobs", params={"limit": 100}).json()["jobs"]}


@pytest.mark.parametrize("cut", ["closing boundary", "last field's value", "last part's head", "after the file"])
def test_a_form_cut_short_is_refused_not_run_without_its_last_part(api, cut):
    wav = tone_wav()
    whole = _form([("file", "a.wav", wav), ("num_speakers", None, b"3")])
    body = {
        "closing boundary": whole[:-len(b"--BB--\r\n")],  # every part whole, the end never said
        "last field's value": whole[:whole.rindex(b"3") + 1],
        "last part's head": whole[:whole.index(b'name="num_speakers"') + 8],
        "after the file": whole[:whole.index(b"--BB", 10) + 6],
    }[cut]
    before = _job_ids(api)
    for path in ("/jobs/diarize", "/diarize"):
        r = api.post(path, content=body, headers={"Content-Type": "multipart/form-data; boundary=BB"})
        # 202 before: the job queued without num_speakers (the default ran, not the 3 asked for)
        _assert_error(r, 400)
        assert "cut short" in r.json()["detail"], r.text
    assert _job_ids(api) == before, "a cut form made a job"
    # the whole body goes through, with what it says
    r = api.post("/jobs/diarize", content=whole, headers={"Content-Type": "multipart/form-data; boundary=BB"})
    assert r.status_code == 202, r.text
    api.post(f"/jobs/{r.json()['job_id']}/cancel")


def test_a_content_length_shorter_than_the_form_is_refused(api):
    """What a client (or a proxy) that miscounted sends: the server reads as many bytes as the
    head says, and the form they hold ends early."""
    body = _form([("file", "a.wav", tone_wav()), ("num_speakers", None, b"3")])
    declared = len(body) - 12  # the closing boundary and the CRLF before it, left outside
    head = (f"POST /jobs/diarize HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\nContent-Length: {declared}\r\n"
            "Content-Type: multipart/form-data; boundary=BB\r\n\r\n").encode()
    before = _job_ids(api)
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert set(json.loads(answer.split(b"\r\n\r\n", 1)[1].split(b"}", 1)[0] + b"}")) == ERROR_KEYS
    assert _job_ids(api) == before


# --- a synchronous call whose job ends as its deadline passes gets the result --------------------


def test_a_result_that_comes_in_as_the_sync_deadline_passes_is_answered_not_504(settings, tmp_path):
    """The moment a real worker would have to hit: the API read the record (still running), the
    worker recorded its result, and only then did the API, past its deadline, try to cancel. The
    interleaving is forced (a worker's write right after the API's read, on the real Redis), as no
    timing of a real worker hits a window of a few milliseconds on purpose."""
    import asyncio

    from api.dispatch import Dispatcher
    from api.errors import SyncTimeout
    from shared.jobs import SUCCEEDED, JobRecord, JobStore, new_job_id
    from shared.queue import make_celery
    from shared.storage import get_storage

    own = settings.model_copy(update={"redis_key_prefix": PREFIX, "queue_name": QUEUE,
                                      "webhook_queue_name": WEBHOOK_QUEUE, "storage_dir": tmp_path})
    store = JobStore.from_settings(own)
    dispatcher = Dispatcher(own, store, get_storage(own), make_celery(own))
    result = {"embedding": [0.1] * 4, "normalized": True, "processing_time": 0.1, "audio_duration": 1.0}

    class WorkerFinishesRightAfterTheRead:
        def __init__(self, inner: Any, job_id: str) -> None:
            self.inner, self.job_id, self.done = inner, job_id, False

        async def get(self, key: str) -> Any:
            raw = await self.inner.get(key)
            if not self.done:
                self.done = True
                store.finish(self.job_id, SUCCEEDED, result=result)
            return raw

        async def aclose(self) -> None:
            await self.inner.aclose()

    async def sync_call() -> Any:
        record = store.create(JobRecord(job_id=new_job_id(), kind="embedding", sync=True))
        dispatcher._aredis = WorkerFinishesRightAfterTheRead(dispatcher.store_async(), record.job_id)
        try:
            return await dispatcher.wait(record.job_id, timeout_s=0.0)
        finally:
            await dispatcher.close()

    try:
        record = asyncio.run(sync_call())
    except SyncTimeout as exc:
        pytest.fail(f"a job that succeeded was answered {exc.status_code}: {exc.detail}")
    assert record.status == SUCCEEDED and record.result == result


# --- a batch holds each of its files to the duration limit, not their sum -----------------------


@pytest.fixture(scope="module")
def short_api(service_env, settings, tmp_path_factory) -> Iterator[Any]:
    """The API under a real uvicorn whose jobs take at most 3 s of audio."""
    with _uvicorn_api(service_env, settings, tmp_path_factory.mktemp("round5-short-api"),
                      AUDIO_ANALYSIS_STORAGE_DIR=str(tmp_path_factory.mktemp("round5-short-uploads")),
                      AUDIO_ANALYSIS_MAX_AUDIO_SECONDS="3") as client:
        yield client


def test_a_batch_holds_each_file_to_the_duration_limit_not_their_sum(short_api):
    two_s = tone_wav(2.0)
    files = [("files", (f"{i}.wav", two_s, "audio/wav")) for i in range(3)]
    r = short_api.post("/jobs/batch", data={"kind": "embedding"}, files=files)
    # 413 before: "the job's audio files are 6 s long together; the limit is 3 s", for three
    # jobs of 2 s each
    assert r.status_code == 202, r.text
    jobs = r.json()["jobs"]
    assert [j["filename"] for j in jobs] == ["0.wav", "1.wav", "2.wav"]
    for job in jobs:
        assert short_api.post(f"/jobs/{job['job_id']}/cancel").status_code == 200
    # a file past the limit on its own still refuses the whole batch, before any job exists
    before = _job_ids(short_api)
    r = short_api.post("/jobs/batch", data={"kind": "embedding"},
                       files=[("files", ("ok.wav", two_s, "audio/wav")), ("files", ("long.wav", tone_wav(4.0), "audio/wav"))])
    _assert_error(r, 413)
    assert _job_ids(short_api) == before


# --- uploads on their way into a slow bucket leave the other requests their threads --------------


def test_uploads_into_a_slow_bucket_do_not_hold_every_other_request(s3_api, bucket):
    import concurrent.futures

    import httpx

    wav = tone_wav()
    r = s3_api.post("/jobs/embedding", files={"file": ("a.wav", wav, "audio/wav")})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    base = str(s3_api.base_url)
    # 3 s a PUT: the API stores 16 at once, so the 48 take three rounds (4 s: 12 s); in the
    # shared pool's 40 threads, the GET below waited about 2 s for the first round to end
    bucket.put_delay_s = 3.0
    try:
        def upload(i: int) -> int:
            with httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=120) as c:
                return c.post("/jobs/embedding", files={"file": (f"{i}.wav", wav, "audio/wav")}).status_code

        with concurrent.futures.ThreadPoolExecutor(48) as pool:
            uploads = [pool.submit(upload, i) for i in range(48)]
            time.sleep(1.0)  # every upload is in the bucket's hands now
            timings = {}
            for path in (f"/jobs/{job_id}", "/health", "/jobs?limit=5"):
                started = time.monotonic()
                assert s3_api.get(path).status_code == 200
                timings[path] = time.monotonic() - started
            codes = [u.result() for u in uploads]
    finally:
        bucket.put_delay_s = 0.0
    print(f"\nwhile 48 uploads waited 3 s each on the bucket: {({k: round(v, 2) for k, v in timings.items()})}")
    assert codes == [202] * 48
    assert max(timings.values()) < 1.0, f"requests waited for a thread the uploads held: {timings}"


# --- synchronous calls waiting on busy or absent workers cost the API next to nothing ------------


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_synchronous_calls_waiting_for_a_worker_leave_the_api_its_core(api):
    import asyncio

    import httpx

    waiting = 200
    wav = tone_wav(0.5)
    pid = api.proc.pid

    async def run() -> tuple[float, int]:
        limits = httpx.Limits(max_connections=waiting + 10)
        async with httpx.AsyncClient(base_url=str(api.base_url), headers={"X-API-Key": KEY}, timeout=120,
                                     limits=limits) as c:
            # nobody consumes this queue: every call waits for its worker (up to sync_timeout_s)
            calls = [asyncio.create_task(c.post("/embedding", files={"file": (f"{i}.wav", wav, "audio/wav")}))
                     for i in range(waiting)]
            deadline = time.monotonic() + 60
            while True:
                listed = (await c.get("/jobs", params={"limit": 100, "status": "queued", "kind": "embedding"})).json()
                if listed["count"] >= 100 and sum(not t.done() for t in calls) == waiting:
                    break
                assert time.monotonic() < deadline, "the synchronous calls never got queued"
                await asyncio.sleep(0.5)
            await asyncio.sleep(3)  # all of them in their wait now
            before, started = _cpu_s(pid), time.monotonic()
            await asyncio.sleep(3)  # 300 clock ticks: 38 % and 4 % of a core are far apart in them
            share = (_cpu_s(pid) - before) / (time.monotonic() - started)
            still = sum(not t.done() for t in calls)
            for t in calls:
                t.cancel()  # the clients hang up: their jobs are cancelled
            await asyncio.gather(*calls, return_exceptions=True)
            return share, still

    share, still = asyncio.run(run())
    print(f"\nthe API's CPU while {still} synchronous calls waited: {share:.0%} of a core")
    assert still == waiting
    # a poll every 50 ms each, for up to an hour: 38 % of a core for 200 calls (4 % now)
    assert share < 0.25, f"{waiting} waiting calls took {share:.0%} of the API's core"


# --- a burst of polls waits for a Redis connection instead of failing the calls ------------------


class SlowRedis:
    """A TCP proxy to the session's Redis whose answers can be held back ``delay_s`` (a Redis busy
    with a large command, a far one): each connection's replies arrive that much later."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        import select

        self.delay_s = 0.0
        # connections opened after this moment get no answer at all until it is None again
        self.hold_since: float | None = None
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.closed = False

        def pipe(client: socket.socket) -> None:
            opened = time.monotonic()
            server = socket.create_connection(upstream)
            try:
                while not self.closed:
                    ready, _, _ = select.select([client, server], [], [], 0.2)
                    for s in ready:
                        data = s.recv(65536)
                        if not data:
                            return
                        if s is server and self.delay_s:
                            time.sleep(self.delay_s)
                        while s is server and self.hold_since is not None and opened >= self.hold_since \
                                and not self.closed:
                            time.sleep(0.05)
                        (server if s is client else client).sendall(data)
            except OSError:
                pass
            finally:
                client.close()
                server.close()

        def accept() -> None:
            while not self.closed:
                try:
                    client, _ = self.sock.accept()
                except OSError:
                    return
                threading.Thread(target=pipe, args=(client,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


@contextlib.contextmanager
def _api_behind_slow_redis(service_env: dict, settings: Any, tmp_path_factory: Any) -> Iterator[tuple[Any, SlowRedis]]:
    from urllib.parse import urlsplit

    real = urlsplit(settings.redis_url)
    proxy = SlowRedis((real.hostname or "127.0.0.1", real.port or 6379))
    url = f"redis://127.0.0.1:{proxy.port}{real.path}"
    try:
        with _uvicorn_api(service_env, settings, tmp_path_factory.mktemp("round5-slow-redis-api"),
                          AUDIO_ANALYSIS_STORAGE_DIR=str(tmp_path_factory.mktemp("round5-slow-redis-uploads")),
                          REDIS_URL=url, AUDIO_ANALYSIS_REDIS_URL=url) as client:
            yield client, proxy
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def slow_redis_api(service_env, settings, tmp_path_factory) -> Iterator[tuple[Any, SlowRedis]]:
    with _api_behind_slow_redis(service_env, settings, tmp_path_factory) as api_and_proxy:
        yield api_and_proxy


@pytest.fixture()
def fresh_slow_redis_api(service_env, settings, tmp_path_factory) -> Iterator[tuple[Any, SlowRedis]]:
    """As slow_redis_api, started for one test: no synchronous call has opened a poll's
    connection yet."""
    with _api_behind_slow_redis(service_env, settings, tmp_path_factory) as api_and_proxy:
        yield api_and_proxy


def test_more_polls_at_once_than_redis_connections_wait_instead_of_failing_the_calls(slow_redis_api, settings):
    import asyncio

    import httpx
    import redis

    api, proxy = slow_redis_api
    waiting = 150  # more than the asyncio client's 100 connections
    wav = tone_wav(0.5)
    store = redis.Redis.from_url(settings.redis_url, decode_responses=True)  # straight, not through the proxy

    def sync_jobs() -> list[dict[str, Any]]:
        keys = [k for k in store.scan_iter(match=f"{PREFIX}:job:*", count=1000) if k.count(":") == 2]
        records = [json.loads(r) for r in store.mget(keys) if r] if keys else []
        return [r for r in records if r.get("sync") and (r.get("filename") or "").startswith("burst-")]

    async def run() -> list[Any]:
        limits = httpx.Limits(max_connections=waiting + 10)
        async with httpx.AsyncClient(base_url=str(api.base_url), headers={"X-API-Key": KEY}, timeout=120,
                                     limits=limits) as c:
            calls = [asyncio.create_task(c.post("/embedding", files={"file": (f"burst-{i}.wav", wav, "audio/wav")}))
                     for i in range(waiting)]
            deadline = time.monotonic() + 60
            while len(sync_jobs()) < waiting:
                assert time.monotonic() < deadline, "the synchronous calls never got queued"
                await asyncio.sleep(0.5)
            await asyncio.sleep(2)
            proxy.delay_s = 2.0  # every poll now holds its connection 2 s: 150 of them at once
            try:
                await asyncio.sleep(6)
            finally:
                proxy.delay_s = 0.0
            await asyncio.sleep(2)
            answered = [t.result() for t in calls if t.done() and not t.exception()]
            for t in calls:
                t.cancel()  # the clients hang up: their jobs are cancelled
            await asyncio.gather(*calls, return_exceptions=True)
            return answered

    answered = asyncio.run(run())
    # before: "job store unavailable, retry later" (503) for the polls past the 100th, while
    # their jobs stayed queued for a worker to run for nobody
    assert [(r.status_code, r.text[:120]) for r in answered] == [], "waiting calls were answered"
    deadline = time.monotonic() + 30
    while any(j["status"] == "queued" for j in sync_jobs()):
        assert time.monotonic() < deadline, "calls that hung up left their jobs queued"
        time.sleep(0.5)


def test_a_synchronous_call_answered_503_leaves_no_job_to_run_for_nobody(fresh_slow_redis_api, settings):
    """The poll's connection stops answering (a Redis stalled, a connection lost): the call is
    answered 503, "retry later", and the job it never heard of is cancelled, not left queued for
    a worker to run while the client's retry runs it again."""
    import redis

    api, proxy = fresh_slow_redis_api
    wav = tone_wav(0.5)
    store = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    # every connection the API needs for a submission and a cancel, opened now (the poll's own
    # asyncio connections come with the first synchronous call's wait)
    warm = api.post("/jobs/embedding", files={"file": ("warm.wav", wav, "audio/wav")})
    assert warm.status_code == 202, warm.text
    assert api.post(f"/jobs/{warm.json()['job_id']}/cancel").status_code == 200
    time.sleep(0.5)
    proxy.hold_since = time.monotonic()  # the connections opened from now on get no answer
    try:
        r = api.post("/embedding", files={"file": ("stalled.wav", wav, "audio/wav")}, timeout=30)
    finally:
        proxy.hold_since = None
    _assert_error(r, 503)
    keys = [k for k in store.scan_iter(match=f"{PREFIX}:job:*", count=1000) if k.count(":") == 2]
    [job] = [j for j in (json.loads(x) for x in store.mget(keys) if x) if j.get("filename") == "stalled.wav"]
    # before: "queued", for a worker to run for nobody
    assert job["status"] == "cancelled", job["status"]


# --- the API's own lack of room or file handles is said as such, not as the client's mistake -----


def _logs(tmp_path: Any) -> Any:
    (tmp_path / "logs").mkdir(exist_ok=True)
    return tmp_path / "logs"


def _open_files_limit(pid: int) -> tuple[int, int]:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files limit")


def test_the_api_takes_all_the_open_files_its_host_allows(service_env, settings, tmp_path):
    """A host's services often start with a soft limit of 1024 open files and a far higher hard
    one; each upload past 64 KB is a temporary file while its form is read, a batch up to 1000."""
    with _uvicorn_api(service_env, settings, _logs(tmp_path), ("prlimit", "--nofile=1024:8192"),
                      AUDIO_ANALYSIS_STORAGE_DIR=str(tmp_path / "uploads")) as api:
        # 1024 before: two batches of 600 files at once ran out of file handles
        assert _open_files_limit(api.proc.pid) == (8192, 8192)


def test_no_file_handle_left_is_a_503_to_retry_not_a_400(service_env, settings, tmp_path):
    """A hard limit the API cannot raise (200 here, as a host may set): a batch needing more
    temporary files than that is the service's own limit for now, said with Retry-After."""
    blob = b"\0" * 70_000  # past the 64 KB spool: a temporary file each
    with _uvicorn_api(service_env, settings, _logs(tmp_path), ("prlimit", "--nofile=200:200"),
                      AUDIO_ANALYSIS_STORAGE_DIR=str(tmp_path / "uploads")) as api:
        r = api.post("/jobs/batch", data={"kind": "embedding"},
                     files=[("files", (f"{i}.wav", blob, "audio/wav")) for i in range(300)])
        # 400 "There was an error parsing the body" before: the client's mistake, it read
        _assert_error(r, 503)
        assert r.headers["Retry-After"] == "30"
        assert r.json()["error_type"] == "ModelError"
        assert api.get("/health").status_code == 200
        # and the handles came back: a batch within them goes through
        r = api.post("/jobs/batch", data={"kind": "embedding"},
                     files=[("files", (f"{i}.wav", tone_wav(), "audio/wav")) for i in range(3)])
        assert r.status_code == 202, r.text


def test_a_full_disk_for_the_forms_temporary_files_is_a_507_not_a_400(service_env, settings, tmp_path):
    import subprocess

    spool = tmp_path / "spool"
    spool.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(spool)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode()[:200]}")
    try:
        with _uvicorn_api(service_env, settings, _logs(tmp_path), TMPDIR=str(spool),
                          AUDIO_ANALYSIS_STORAGE_DIR=str(tmp_path / "uploads")) as api:
            r = api.post("/jobs/embedding", files={"file": ("big.wav", tone_wav(40.0), "audio/wav")})
            # 400 "There was an error parsing the body" before
            _assert_error(r, 507)
            assert r.headers["Retry-After"] == "30"
            # an upload the spool holds in memory still goes through
            r = api.post("/jobs/embedding", files={"file": ("small.wav", tone_wav(1.0), "audio/wav")})
            assert r.status_code == 202, r.text
    finally:
        subprocess.run(["umount", str(spool)], check=False)


# --- an upgrade to a WebSocket is answered as the HTTP request it also is ------------------------


def _raw_answer(port: int, request: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return head, body


def test_a_websocket_upgrade_is_answered_in_the_documented_shape(api):
    upgrade = (b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    head, body = _raw_answer(api.port, b"GET /jobs/0123456789abcdef0123456789abcdef HTTP/1.1\r\nHost: t\r\n"
                             + f"X-API-Key: {KEY}\r\n".encode() + upgrade + b"\r\n")
    # "HTTP/1.1 403 Forbidden" with an empty body before, whatever the path
    assert head.startswith(b"HTTP/1.1 404 "), head
    assert set(json.loads(body)) == ERROR_KEYS, body
    head, body = _raw_answer(api.port, b"GET /health HTTP/1.1\r\nHost: t\r\n" + upgrade + b"\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert json.loads(body)["status"] in ("healthy", "degraded")


# --- a job record the store lost during a synchronous call is the service's failure --------------


def test_a_record_lost_by_the_store_during_a_synchronous_call_is_a_503(api, settings):
    import concurrent.futures

    import redis

    store = redis.Redis.from_url(settings.redis_url, decode_responses=True)

    def record_key() -> str | None:
        for key in store.scan_iter(match=f"{PREFIX}:job:*", count=1000):
            raw = store.get(key) if key.count(":") == 2 else None
            if raw and json.loads(raw).get("filename") == "evicted.wav":
                return key
        return None

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(api.post, "/embedding", files={"file": ("evicted.wav", tone_wav(), "audio/wav")})
        deadline = time.monotonic() + 30
        while (key := record_key()) is None:
            assert time.monotonic() < deadline, "the synchronous call never made its job"
            time.sleep(0.2)
        store.delete(key)  # what maxmemory's eviction (allkeys-lru) or a flush does to it
        r = call.result(timeout=30)
    # 404 "job ... disappeared", error_type ValidationError, before: the client's mistake, it said
    _assert_error(r, 503)
    assert r.json()["error_type"] == "ModelError"


def test_the_openapi_document_names_every_error_an_upload_may_get(api):
    spec = api.get("/openapi.json").json()
    for path in ("/jobs/diarize", "/jobs/batch", "/diarize", "/voiceprints"):
        responses = spec["paths"][path]["post"]["responses"]
        # 400 (a cut or malformed form), 408 (a stalled body) and 507 (no room) were missing
        for code in ("400", "408", "413", "415", "422", "503", "507"):
            assert code in responses, (path, code, sorted(responses))
            schema = responses[code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, code, schema)



# --- a bucket that cannot store an upload is the service's state, said as such --------------------


def test_a_bucket_refusing_uploads_is_a_503_to_retry_not_a_500(s3_api, bucket):
    before = _job_ids(s3_api)
    bucket.failing_puts = True
    try:
        r = s3_api.post("/jobs/embedding", files={"file": ("a.wav", tone_wav(), "audio/wav")})
    finally:
        bucket.failing_puts = False
    # 500 "internal server error" before
    _assert_error(r, 503)
    assert r.json()["error_type"] == "ModelError" and r.headers["Retry-After"] == "30"
    assert _job_ids(s3_api) == before, "a job without its upload"
    r = s3_api.post("/jobs/embedding", files={"file": ("a.wav", tone_wav(), "audio/wav")})
    assert r.status_code == 202, r.text
    s3_api.post(f"/jobs/{r.json()['job_id']}/cancel")


# --- another site's page cannot make a user's browser change anything (CSRF) ---------------------


@pytest.fixture(scope="module")
def open_api(service_env, settings, tmp_path_factory) -> Iterator[Any]:
    """The API under a real uvicorn without API keys: the default, on a workstation or a LAN."""
    with _uvicorn_api(service_env, settings, tmp_path_factory.mktemp("round5-open-api"),
                      AUDIO_ANALYSIS_STORAGE_DIR=str(tmp_path_factory.mktemp("round5-open-uploads")),
                      AUDIO_ANALYSIS_API_KEYS="[]", AUDIO_ANALYSIS_ADMIN_API_KEYS="[]") as client:
        client.headers.pop("X-API-Key")
        yield client


# what Chromium and Firefox send with a multipart fetch() or form a page of another site makes
# (no preflight: multipart/form-data is a "simple" request), and with one the page at / makes
FROM_ANOTHER_SITE = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
FROM_A_SIBLING_SITE = {"Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"}
FROM_THE_PAGE = {"Origin": "http://127.0.0.1", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}


def test_a_page_of_another_site_cannot_plant_a_voiceprint_or_queue_jobs(open_api, settings):
    from shared.voiceprints import embedding_model

    model = embedding_model(settings)
    vector = json.dumps([1.0] + [0.0] * (model.dimension - 1)).encode()

    def plant(label: str, headers: dict[str, str]):
        return open_api.post("/voiceprints/import", headers=headers, data={"label": label, "model": model.name},
                             files={"file": ("v.json", vector, "application/json")})

    def labels() -> set[str]:
        return {vp["label"] for vp in open_api.get("/voiceprints", params={"limit": 1000}).json()["voiceprints"]}

    before = _job_ids(open_api)
    for headers in (FROM_ANOTHER_SITE, FROM_A_SIBLING_SITE):
        # 201 before: the voiceprint stored, and every later voiceprints=all diarization would
        # name a speaker "Mallory"
        r = plant("Mallory", headers)
        _assert_error(r, 403)
        r = open_api.post("/jobs/embedding", headers=headers, files={"file": ("a.wav", tone_wav(), "audio/wav")})
        _assert_error(r, 403)
    assert "Mallory" not in labels()
    assert _job_ids(open_api) == before
    # the service's own page, and clients that are not browsers, go on as before
    for label, headers in (("Alice", FROM_THE_PAGE), ("Bob", {})):
        r = plant(label, headers)
        assert r.status_code == 201, r.text
        assert open_api.delete(f"/voiceprints/{r.json()['id']}", headers=headers).status_code == 204
    r = open_api.post("/jobs/embedding", headers=FROM_THE_PAGE, files={"file": ("a.wav", tone_wav(), "audio/wav")})
    assert r.status_code == 202, r.text
    assert open_api.post(f"/jobs/{r.json()['job_id']}/cancel", headers=FROM_ANOTHER_SITE).status_code == 403
    assert open_api.post(f"/jobs/{r.json()['job_id']}/cancel", headers=FROM_THE_PAGE).status_code == 200
