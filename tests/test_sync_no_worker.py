"""A synchronous call made while no worker can take its job is answered 503 at once.

Before, ``POST /diarize`` (and every other synchronous route) with no worker running queued its
job and waited ``sync_timeout_s`` (an hour) for a 504: the client, or the load balancer in front
of it (60 s), saw a hang, and the job stayed queued to run later for nobody. Now a worker's
heartbeat keeps one key per queue it consumes alive (worker/lifecycle.py, announce_queues), and
the API reads it once per call (api/dispatch.py, Dispatcher.has_worker).

Each test runs an in-process API on a queue and key prefix of its own, which no session worker
consumes and no heartbeat names; none needs the session's worker with models.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import redis
import soundfile as sf

ERROR_KEYS = {"detail", "error_type", "timestamp"}
PREFIX = "aa-nowork"
QUEUE = "audio-nowork"
RESULT = {"embedding": [0.1] * 192, "normalized": True, "processing_time": 0.1, "audio_duration": 1.0,
          "model_device": "cpu"}


def _wav(seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(buf, (np.sin(2 * np.pi * 220 * t) * 8000).astype(np.int16), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


WAV = _wav()
EMBEDDING = json.dumps([0.1] * 192).encode()
# every synchronous route, with a valid request
SYNC_CALLS: dict[str, dict[str, Any]] = {
    "/diarize": {"files": {"file": ("a.wav", WAV, "audio/wav")}},
    "/embedding": {"files": {"file": ("a.wav", WAV, "audio/wav")}},
    "/compare": {"files": {"file1": ("a.wav", WAV, "audio/wav"), "file2": ("b.wav", WAV, "audio/wav")}},
    "/compare_embedding": {"files": {"audio": ("a.wav", WAV, "audio/wav"),
                                     "embedding": ("e.json", EMBEDDING, "application/json")}},
    "/voiceprints": {"files": [("files", ("a.wav", WAV, "audio/wav"))], "data": {"label": "Alice"}},
}


@pytest.fixture()
def own(settings, tmp_path) -> Iterator[Any]:
    """Settings on a queue and key prefix of this file's own, uploads under tmp_path; a sync
    call that is not refused gives up after 5 s (the old code's hang, kept short)."""
    changes = {"redis_key_prefix": PREFIX, "queue_name": QUEUE, "webhook_queue_name": QUEUE + "-hooks",
               "storage_dir": tmp_path / "uploads", "sync_timeout_s": 5.0}
    r = redis.Redis.from_url(settings.redis_url)

    def clean() -> None:
        for key in r.scan_iter(match=f"{PREFIX}:*", count=1000):
            r.delete(key)
        r.delete(QUEUE, QUEUE + "-hooks", f"_kombu.binding.{QUEUE}", f"_kombu.binding.{QUEUE}-hooks")

    clean()
    yield settings.model_copy(update=changes)
    clean()


def _client(settings) -> Any:
    from fastapi.testclient import TestClient

    from api.main import create_app

    return TestClient(create_app(settings), raise_server_exceptions=False)


def _announce(settings, ttl_s: float, queues: list[str] | None = None, load_error: str | None = None) -> None:
    """What a worker's heartbeat loop writes for its queues (the same function)."""
    from shared.jobs import JobStore
    from worker.lifecycle import announce_queues

    info = {"worker": "fake@host:1", "queues": [QUEUE] if queues is None else queues, "load_error": load_error}
    announce_queues(JobStore.from_settings(settings), info, ttl_s=ttl_s)


def _jobs(c) -> list[dict[str, Any]]:
    return c.get("/jobs", params={"limit": 100}).json()["jobs"]


def _assert_no_worker(r, waited: float) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    body = r.json()
    assert set(body) == ERROR_KEYS, body
    assert body["error_type"] == "ModelError" and "no worker" in body["detail"], body
    assert int(r.headers["Retry-After"]) > 0, r.headers
    assert waited < 2.0, f"answered after {waited:.1f} s"


def _taken_and_run(c, settings) -> Any:
    """A synchronous /embedding the API takes: its job is queued (sync) while the call waits, a
    stand-in for the worker finishes it, and the call's answer is returned."""
    from shared.jobs import SUCCEEDED, JobStore

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(c.post, "/embedding", **SYNC_CALLS["/embedding"])
        deadline = time.monotonic() + 5
        while not (jobs := _jobs(c)):
            assert not call.done(), call.result().text
            assert time.monotonic() < deadline, "the synchronous call made no job"
            time.sleep(0.05)
        [job] = jobs
        assert job["status"] == "queued" and job["sync"] is True, job
        JobStore.from_settings(settings).finish(job["job_id"], SUCCEEDED, result=RESULT)
        return call.result(timeout=10)


def test_every_synchronous_call_without_a_worker_is_answered_503_at_once_and_leaves_nothing(own):
    r = redis.Redis.from_url(own.redis_url)
    with _client(own) as c:
        for path, request in SYNC_CALLS.items():
            started = time.monotonic()
            answer = c.post(path, **request)
            _assert_no_worker(answer, time.monotonic() - started)
        # no job was made: none listed, none queued for Celery, no upload stored
        assert _jobs(c) == []
        assert r.llen(QUEUE) == 0
        uploads = own.storage_dir
        assert not uploads.exists() or not any(uploads.iterdir()), list(uploads.iterdir())
        # a bad request is still told what is wrong with it first
        bad = c.post("/diarize", files={"file": ("a.wav", WAV, "audio/wav")}, data={"num_speakers": "two"})
        assert bad.status_code == 422, bad.text
        # a job (POST /jobs/...) is queued as ever: it waits for a worker
        job = c.post("/jobs/embedding", files={"file": ("a.wav", WAV, "audio/wav")})
        assert job.status_code == 202, job.text
        assert c.get(f"/jobs/{job.json()['job_id']}").json()["status"] == "queued"
        assert r.llen(QUEUE) == 1


def test_only_a_live_worker_of_the_queue_that_can_run_jobs_lets_the_call_through(own):
    with _client(own) as c:
        # a worker of another queue (webhook deliveries), and one whose models failed to load
        _announce(own, 30, queues=[own.webhook_queue_name])
        _announce(own, 30, load_error="RuntimeError: CUDA error: no CUDA GPUs are available")
        started = time.monotonic()
        _assert_no_worker(c.post("/embedding", **SYNC_CALLS["/embedding"]), time.monotonic() - started)
        assert _jobs(c) == []

        # a live worker of the queue (loading its models, or with them): the call is taken and waits
        _announce(own, 30)
        answer = _taken_and_run(c, own)
    assert answer.status_code == 200, answer.text
    assert answer.json()["embedding"] == RESULT["embedding"]


def test_a_worker_older_than_the_queue_keys_still_takes_synchronous_calls(own):
    """A rolling upgrade that brings the API up before its workers: their heartbeats (as a
    worker before the queue keys wrote them: no ``queues``) are taken for this queue's, as every
    call waited for them before; without it every synchronous call was a 503 until the workers
    caught up. A webhook-only worker of that version, or one whose models failed, still is not."""
    from shared.jobs import JobStore

    store = JobStore.from_settings(own)
    old = {"worker": "old@host:1", "pid": 1, "diarization_model_loaded": True, "verification_model_loaded": True,
           "model_device": "cpu", "loads_models": True, "load_error": None}
    with _client(own) as c:
        store.heartbeat("webhooks@host:2", {**old, "worker": "webhooks@host:2", "loads_models": False}, ttl_s=30)
        store.heartbeat("broken@host:3", {**old, "worker": "broken@host:3", "load_error": "ModelError: no weights"},
                        ttl_s=30)
        started = time.monotonic()
        _assert_no_worker(c.post("/embedding", **SYNC_CALLS["/embedding"]), time.monotonic() - started)
    with _client(own) as c:  # a new API process: nothing remembered of the look above
        store.heartbeat("old@host:1", old, ttl_s=30)
        answer = _taken_and_run(c, own)
    assert answer.status_code == 200, answer.text


def test_a_waiting_call_whose_queue_loses_its_last_worker_gives_up_with_the_same_503(own):
    """Taken while a worker was live; the worker goes (its heartbeat lapses) before it took the
    job: the call is answered 503 within a heartbeat interval or two, not after sync_timeout_s,
    and its job is cancelled, not left queued for a worker that comes up later."""
    from shared.jobs import JobStore

    quick = own.model_copy(update={"worker_heartbeat_interval_s": 0.3})
    with _client(quick) as c:
        _announce(quick, 1)  # as a worker with a 0.33 s interval writes it, once: then it is gone
        started = time.monotonic()
        answer = c.post("/embedding", **SYNC_CALLS["/embedding"])
        waited = time.monotonic() - started
        assert answer.status_code == 503, answer.text
        assert set(answer.json()) == ERROR_KEYS and "Retry-After" in answer.headers
        assert waited < 3.0, waited
        [job] = _jobs(c)
        assert job["status"] == "cancelled", job
        assert JobStore.from_settings(quick).get(job["job_id"]).status == "cancelled"


def test_without_the_requirement_a_call_waits_for_a_worker_to_come(own):
    """sync_requires_live_worker=false (workers that scale from zero on the queue's length): the
    call is queued and waits, as before, here for its 1 s sync_timeout_s."""
    relaxed = own.model_copy(update={"sync_requires_live_worker": False, "sync_timeout_s": 1.0})
    with _client(relaxed) as c:
        answer = c.post("/embedding", **SYNC_CALLS["/embedding"])
        assert answer.status_code == 504, answer.text
        assert [j["status"] for j in _jobs(c)] == ["cancelled"]


# the simulated model load of the worker below (python -m tests.test_sync_no_worker)
LOAD_S = 3.0
LOAD_ERROR = "RuntimeError: no CUDA GPUs are available (simulated)"


def test_a_real_worker_is_live_while_its_models_load_and_not_once_their_load_failed(own, service_env, tmp_path):
    """A Celery worker (this module's own, whose model load takes 3 s and then fails) announces
    the queues it consumes (its -Q) from its start: a synchronous call is taken while it loads,
    since its job runs once the models are loaded. Once the load failed, its heartbeat says why
    and the queue's key lapses with it: the API refuses again."""
    import asyncio

    from api.dispatch import Dispatcher
    from shared.jobs import JobStore
    from shared.queue import make_celery
    from shared.storage import get_storage

    env = {**{k: v for k, v in service_env.items() if not k.startswith("_")}, **os.environ,
           "AUDIO_ANALYSIS_WORKER_HEARTBEAT_INTERVAL_S": "0.5", "AUDIO_ANALYSIS_DEVICE": "cpu",
           "AUDIO_ANALYSIS_REDIS_KEY_PREFIX": PREFIX, "AUDIO_ANALYSIS_STORAGE_DIR": str(own.storage_dir)}
    store = JobStore.from_settings(own)

    def live(settings) -> bool:
        async def check() -> bool:
            dispatcher = Dispatcher(settings, store, get_storage(settings), make_celery(settings))
            try:
                return await dispatcher.has_worker()
            finally:
                await dispatcher.close()

        return asyncio.run(check())

    def beats() -> list[dict[str, Any]]:
        return [w for w in store.workers() if w["worker"].startswith("nowork@")]

    assert not live(own)
    log_path = tmp_path / "worker.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "tests.test_sync_no_worker", "--pool", "prefork", "--concurrency", "1",
                             "-Q", QUEUE, "-n", "nowork@%h", "--without-gossip", "--without-mingle"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 30
        while not live(own):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.1)
        # loading: live for its queue, and for no other; no heartbeat for /health yet, as before
        assert beats() == []
        assert not live(own.model_copy(update={"queue_name": QUEUE + "-other"}))
        deadline = time.monotonic() + LOAD_S + 10
        while not beats():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.1)
        [beat] = beats()
        assert beat["load_error"] == LOAD_ERROR and beat["queues"] == [QUEUE], beat
        # the key lives 1 s past the last announce, a heartbeat (0.5 s) or less before the load
        # failed; before, the failed worker announced the queue for good. 10 s: each live() here
        # builds a Celery app and a dispatcher, which a loaded host takes its time over
        deadline = time.monotonic() + 10
        while live(own):
            assert time.monotonic() < deadline, "a worker whose models failed to load still counts"
            time.sleep(0.1)
        with _client(own) as c:
            started = time.monotonic()
            _assert_no_worker(c.post("/embedding", **SYNC_CALLS["/embedding"]), time.monotonic() - started)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        log.close()


if __name__ == "__main__":
    # the worker of the test above: the real one, with a model load that takes LOAD_S and fails
    from engine.core import Engine
    from worker.celery_app import app

    def _load_models(self: Engine) -> Engine:
        time.sleep(LOAD_S)
        raise RuntimeError(LOAD_ERROR.split(": ", 1)[1])

    Engine.load_models = _load_models  # type: ignore[method-assign]
    app.worker_main(["worker", *sys.argv[1:]])


def test_a_long_sweep_does_not_let_the_queue_lapse(settings, monkeypatch):
    """The heartbeat thread also runs the recovery pass and the storage sweep, and a sweep of a
    large or slow bucket can outlast the queue key's lifetime (3 heartbeats): synchronous calls
    would have been refused 503 while a healthy worker swept. The key is held up for the passes.
    The loop is the worker's own, run here in-process with a sweep that takes 2 s against a key
    lifetime of 0.6 s; what it announces stands in for a worker's identity."""
    import threading

    from shared.jobs import JobStore
    from worker import lifecycle, recovery

    local = settings.model_copy(update={"worker_heartbeat_interval_s": 0.2, "worker_load_models": False})
    store = JobStore.from_settings(local)
    key = store.consumers_key(QUEUE)
    store.redis.delete(key)
    sweeping = threading.Event()

    class SlowStorage:
        def sweep(self, older_than_s: float) -> int:
            sweeping.set()
            time.sleep(2.0)
            sweeping.clear()
            return 0

    monkeypatch.setattr(lifecycle, "get_settings", lambda: local)
    monkeypatch.setattr(lifecycle, "get_storage", lambda settings=None: SlowStorage())
    monkeypatch.setattr(lifecycle, "heartbeat_info", lambda: {"worker": "sweeper@host:1", "queues": [QUEUE],
                                                              "load_error": None})
    monkeypatch.setattr(recovery, "recover_stalled_jobs", lambda *a, **k: None)
    monkeypatch.setattr(recovery, "recover_lost_deliveries", lambda *a, **k: None)
    try:
        with _heartbeat_loop_running():
            assert sweeping.wait(5), "the sweep never ran"
            lapsed = 0
            while sweeping.is_set():
                lapsed += not store.redis.exists(key)
                time.sleep(0.05)
            assert lapsed == 0, f"the queue's key lapsed {lapsed} times during the sweep"
            # back to its lifetime (whole seconds) after the pass, not the pass's 300 s: waited for
            # (the loop's thread announces it just after the sweep returns; a fixed 0.1 s raced it)
            deadline = time.monotonic() + 5
            while not 0 < (left_ms := store.redis.pttl(key)) <= 1000:
                assert time.monotonic() < deadline, f"the queue's key kept {left_ms} ms after the pass"
                time.sleep(0.02)
    finally:
        store.redis.delete(key)


@contextlib.contextmanager
def _heartbeat_loop_running() -> Iterator[None]:
    """The worker's own heartbeat loop (worker/lifecycle.py) in a thread of this process, as it
    runs once the models loaded; stopped, and the process's boot state put back, on the way out."""
    import threading

    from worker import lifecycle

    booted, stop = lifecycle._state["booted"], threading.Event()
    was_booted = booted.is_set()
    booted.set()
    thread = threading.Thread(target=lifecycle._heartbeat_loop, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        if not was_booted:
            booted.clear()


def test_a_webhook_worker_heartbeats_but_runs_no_pass_or_sweep(settings, monkeypatch):
    """A webhook worker (no models, the API's image) heartbeats since it is listed in /health,
    but the recovery passes and the upload sweep stay the job workers': compose mounts the
    uploads' volume in those only, so a pass of the webhook worker's that failed a job deleted
    nothing of its upload, and its sweep swept an empty folder."""
    from shared.jobs import JobStore
    from worker import lifecycle, recovery

    local = settings.model_copy(update={"worker_heartbeat_interval_s": 0.1, "worker_load_models": False})
    # as worker_ready boots a threads-pool worker (worker/lifecycle.py clear_stopping)
    monkeypatch.setitem(lifecycle._state, "runs_passes", False)
    store = JobStore.from_settings(local)
    ran: list[str] = []

    class WatchedStorage:
        def sweep(self, older_than_s: float) -> int:
            ran.append("sweep")
            return 0

    name = "webhooks@host:9"
    monkeypatch.setattr(lifecycle, "get_settings", lambda: local)
    monkeypatch.setattr(lifecycle, "get_storage", lambda settings=None: WatchedStorage())
    monkeypatch.setattr(lifecycle, "worker_name", lambda: name)
    monkeypatch.setattr(lifecycle, "heartbeat_info", lambda: {"worker": name, "queues": ["webhooks-none"],
                                                              "loads_models": False, "load_error": None})
    for pass_name in ("recover_stalled_jobs", "fail_interrupted_submissions", "recover_lost_deliveries"):
        monkeypatch.setattr(recovery, pass_name, lambda *a, _n=pass_name, **k: ran.append(_n))
    try:
        with _heartbeat_loop_running():
            deadline = time.monotonic() + 5
            while not store.redis.exists(store.key("worker", name)):
                assert time.monotonic() < deadline, "no heartbeat"
                time.sleep(0.05)
            time.sleep(0.5)  # five heartbeats
            assert ran == []
    finally:
        store.forget_worker(name)
