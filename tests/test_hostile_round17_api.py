"""Round 17 of what a hostile or careless client tried against the API's request handling, after
round 16 (tests/test_hostile_round16_api.py, tests/test_hostile_round16b_api.py). Each test fails
on the code before its fix:

* an API told to stop (SIGTERM: a rolling deploy, ``docker stop``) while a synchronous call waited
  for its job waited for that call, up to ``AUDIO_ANALYSIS_SYNC_TIMEOUT_S`` (an hour), so the
  orchestrator killed it (SIGKILL, 10 s after ``docker stop``, 30 s in Kubernetes) and the call's
  job ran on for nobody while its client, cut off, submitted it again: the audio ran twice. The
  API now waits ``AUDIO_ANALYSIS_HTTP_SHUTDOWN_GRACE_S`` for the requests in flight, then cancels
  the jobs of the synchronous calls still waiting (not one made with an ``Idempotency-Key``, whose
  retry is answered that job's result) and exits;
* a walk of ``GET /jobs`` through jobs whose records had expired (their index entries outlive them
  by up to a day) came back as empty pages, each with a ``next_cursor`` (5 of them for 25 expired
  jobs at ``limit=5``), and a client that stopped at an empty page never saw the older jobs behind
  them: a page passes over expired entries, as a filtered one did;
* a client that asked for a long result and read nothing of it held the whole result in the API's
  memory for as long as it kept the connection (40 such connections: 248 MB, for ever): a response
  its client reads nothing of for ``AUDIO_ANALYSIS_HTTP_BODY_TIMEOUT_S`` has its connection aborted;
  a slow reader is not cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import drop_namespace, parked_store, tone_wav, wait_for_api

ERROR_KEYS = {"detail", "error_type", "timestamp"}


@contextlib.contextmanager
def _uvicorn_api(service_env: dict, settings: Any, tmp_path_factory: Any, name: str,
                 env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen, Any]]:
    """The API under uvicorn (api.serve) with key prefix, queues and storage of its own, which no
    worker consumes (a job stays where the test puts it), and ``env``'s settings: (base URL, its
    process, its job store). Its keys and queues are deleted afterwards."""
    from cli.launcher import Stack, free_port

    prefix, queues = f"aa-{name}", (f"audio-{name}", f"webhooks-{name}")
    full = {k: v for k, v in service_env.items() if not k.startswith("_")}
    full.update({
        "AUDIO_ANALYSIS_API_KEYS": json.dumps([]),
        "AUDIO_ANALYSIS_REDIS_KEY_PREFIX": prefix, "AUDIO_ANALYSIS_QUEUE_NAME": queues[0],
        "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": queues[1],
        "AUDIO_ANALYSIS_STORAGE_DIR": str(tmp_path_factory.mktemp(f"{name}-uploads")), **env,
    })
    stack = Stack(env={**os.environ, **full}, log_dir=tmp_path_factory.mktemp(f"{name}-api"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        proc = stack.start_api("127.0.0.1", port)
        wait_for_api(base, proc)
        yield base, proc, parked_store(settings, name)
    finally:
        stack.stop(timeout_s=5)
        drop_namespace(settings.redis_url, prefix, *queues)


# --- an API told to stop while synchronous calls wait -------------------------------------------
@pytest.fixture
def stoppable_api(service_env, settings, tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen, Any]]:
    """Synchronous calls wait without a worker (sync_requires_live_worker off, as where workers
    scale from zero) for an hour, as the default timeout has them; a stop grace of 2 s."""
    with _uvicorn_api(service_env, settings, tmp_path_factory, "r17stop", {
        "AUDIO_ANALYSIS_SYNC_REQUIRES_LIVE_WORKER": "false",
        "AUDIO_ANALYSIS_SYNC_TIMEOUT_S": "3600",
        "AUDIO_ANALYSIS_HTTP_SHUTDOWN_GRACE_S": "2",
    }) as api:
        yield api


def _call_in_background(base: str, headers: dict[str, str]) -> dict[str, Any]:
    """POST /diarize from a thread; its answer (or the error that ended it) is put in the
    returned dict once the call ends."""
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["answer"] = httpx.post(f"{base}/diarize", files={"file": ("call.wav", tone_wav(1.0), "audio/wav")},
                                           headers=headers, timeout=120)
        except httpx.HTTPError as exc:
            outcome["error"] = type(exc).__name__

    threading.Thread(target=call, daemon=True).start()
    return outcome


def test_a_stopping_api_cancels_the_jobs_of_the_synchronous_calls_it_gives_up(stoppable_api):
    from cli.launcher import wait_until

    base, proc, store = stoppable_api
    plain = _call_in_background(base, {})
    keyed = _call_in_background(base, {"Idempotency-Key": "r17-stop-keyed"})
    wait_until(lambda: len(store.recent(10)) == 2, 30, "both synchronous calls' jobs queued", proc)
    jobs = {r.job_id: r for r in store.recent(10)}
    assert all(r.sync and r.status == "queued" for r in jobs.values())

    proc.send_signal(signal.SIGTERM)
    # what an orchestrator does: the grace it gives (Kubernetes' 30 s; docker stop's is 10 s), then SIGKILL
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)

    keyed_jobs = json.loads(store.redis.hget(store.key_entry(None, "r17-stop-keyed"), "jobs"))
    after = {job_id: store.get(job_id).status for job_id in jobs}
    # before: both still queued (the API was killed waiting for the calls), each to run once a
    # worker came, for clients that had been cut off and submitted again
    assert sorted(after.values()) == ["cancelled", "queued"], after
    # the job left to run is the keyed call's: its retry with the key is answered that job's result
    assert [job_id for job_id, status in after.items() if status == "queued"] == keyed_jobs
    # both calls answered 503 in the documented shape, which clients retry (a text/plain 500 from
    # uvicorn, once the stop was bounded, with nothing said about the job)
    wait_until(lambda: len(plain) and len(keyed), 10, "the two calls ended", None)
    for outcome, says in ((plain, "its job was cancelled"), (keyed, "retry with the same Idempotency-Key")):
        answer = outcome.get("answer")
        assert answer is not None and answer.status_code == 503, outcome
        assert set(answer.json()) == ERROR_KEYS and answer.json()["error_type"] == "ModelError"
        assert says in answer.json()["detail"] and answer.headers["retry-after"]


def test_the_shutdown_cancels_a_waiting_calls_job_before_the_cancellation_reaches_the_call(settings, tmp_path):
    """The order the test above left to chance, forced: the lifespan's shutdown (close()) ran
    before the server's cancellation of the call had reached it through the middleware's task
    groups, as a loaded host had it (CI: both jobs left queued). The job is the call's from the moment it waits,
    not from the moment the cancellation reaches it."""
    import asyncio
    import io

    from starlette.datastructures import UploadFile

    from api.dispatch import Dispatcher
    from shared.errors import ModelError
    from shared.jobs import CANCELLED, JobStore
    from shared.kinds import KINDS
    from shared.queue import make_celery
    from shared.storage import get_storage

    name = "r17order"
    own = settings.model_copy(update={
        "redis_key_prefix": f"aa-{name}", "queue_name": f"audio-{name}", "webhook_queue_name": f"webhooks-{name}",
        "storage_dir": tmp_path, "sync_requires_live_worker": False, "sync_timeout_s": 3600.0})
    store = JobStore.from_settings(own)
    dispatcher = Dispatcher(own, store, get_storage(own), make_celery(own))

    async def stop_during_a_call() -> tuple[str, BaseException | None]:
        upload = UploadFile(io.BytesIO(tone_wav(1.0)), filename="call.wav")
        submission = await dispatcher.read(KINDS["diarize"], {"file": upload}, {})
        call = asyncio.create_task(dispatcher.run_sync(submission))
        while not store.recent(1):
            await asyncio.sleep(0.05)
        [record] = store.recent(1)
        await asyncio.sleep(0.5)  # the call polls its job
        # the server cancels the call, and its lifespan's shutdown runs before the cancellation
        # has reached the call (no turn of the loop between the two here)
        call.cancel()
        await dispatcher.close()
        try:
            await call
        except (ModelError, asyncio.CancelledError) as exc:
            return record.job_id, exc
        return record.job_id, None

    try:
        job_id, ended = asyncio.run(stop_during_a_call())
        # before: queued, to run for nobody once a worker came
        assert store.get(job_id).status == CANCELLED
        assert isinstance(ended, ModelError) and ended.status_code == 503, ended
    finally:
        drop_namespace(settings.redis_url, f"aa-{name}", f"audio-{name}", f"webhooks-{name}")


# --- a listing walked past jobs whose records expired --------------------------------------------
@pytest.fixture
def own_api(settings, tmp_path) -> Iterator[tuple[Any, Any]]:
    """The API in-process with key prefix, queues and storage of its own (no worker consumes
    them): (its TestClient, its job store)."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from shared.jobs import JobStore

    name = "r17list"
    own = settings.model_copy(update={"redis_key_prefix": f"aa-{name}", "queue_name": f"audio-{name}",
                                      "webhook_queue_name": f"webhooks-{name}", "storage_dir": tmp_path / "uploads"})
    try:
        with TestClient(create_app(own), raise_server_exceptions=False) as client:
            yield client, JobStore.from_settings(own)
    finally:
        drop_namespace(settings.redis_url, f"aa-{name}", f"audio-{name}", f"webhooks-{name}")


def test_a_listing_walks_past_expired_records_instead_of_giving_empty_pages(own_api):
    client, store = own_api
    ids = []
    for n in range(33):
        r = client.post("/jobs/diarize", files={"file": (f"j{n}.wav", tone_wav(0.2), "audio/wav")})
        assert r.status_code == 202, r.text
        ids.append(r.json()["job_id"])
    # the 25 in the middle expired: a record lives AUDIO_ANALYSIS_RESULT_EXPIRES_S after its job
    # ENDED, so jobs that ended at once go before older ones that waited in the queue for hours;
    # the listing's index keeps every entry up to 51 h. Deleted here as their time to live does
    older, expired, newest = ids[:3], ids[3:28], ids[28:]
    for job_id in expired:
        store.redis.delete(store._job_key(job_id))

    pages: list[list[str]] = []
    cursor = None
    while True:
        r = client.get("/jobs", params={"limit": 5, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        pages.append([job["job_id"] for job in r.json()["jobs"]])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    # before: [5, 0, 0, 0, 0, 0, 3]: five empty pages, each with a next_cursor (the web page's
    # "more" showed nothing, and a client that stopped at an empty page never saw the older three)
    assert pages == [newest[::-1], older[::-1]], [len(p) for p in pages]
    # filtered listings skip them as they always did
    assert [j["job_id"] for j in client.get("/jobs", params={"limit": 10, "status": "queued"}).json()["jobs"]] \
        == newest[::-1] + older[::-1]


# --- a client that asks for a long result and does not read it ----------------------------------
def _long_result(store: Any, base: str) -> tuple[str, int]:
    """A succeeded diarization of 500,000 turns (27 MB as JSON, more than the kernel buffers of a
    connection hold, 4 MB to send and 6 MB to receive here): (its job id, its result's size).
    Submitted through the API; its result is put in its record as a worker puts it (a worker
    producing it would need hours of audio and of CPU)."""
    r = httpx.post(f"{base}/jobs/diarize", files={"file": ("long.wav", tone_wav(0.5), "audio/wav")}, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    turns = [{"start": n * 0.5, "end": n * 0.5 + 0.4, "speaker": f"SPEAKER_{n % 7:02d}"} for n in range(500_000)]
    store.mark_running(job_id)
    store.finish(job_id, "succeeded", result={
        "diarization_results": turns, "segments_count": len(turns), "processing_time": 1.0,
        "audio_duration": 50_000.0, "model_device": "cpu"})
    size = len(httpx.get(f"{base}/jobs/{job_id}/result", timeout=30).content)
    return job_id, size


def _ask(base: str, job_id: str) -> socket.socket:
    """GET the result, reading nothing of it yet."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"GET /jobs/{job_id}/result HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    return sock


def _read_to_end(sock: socket.socket, pause_s: float = 0.0) -> int:
    """Bytes read until the connection ends (closed, or reset by the server), ``pause_s`` after
    each read."""
    sock.settimeout(30)
    got = 0
    try:
        while chunk := sock.recv(65536):
            got += len(chunk)
            time.sleep(pause_s)
    except ConnectionResetError:
        pass
    sock.close()
    return got


def test_a_response_its_client_does_not_read_is_cut_and_a_slow_reader_is_not(service_env, settings,
                                                                                tmp_path_factory):
    with _uvicorn_api(service_env, settings, tmp_path_factory, "r17read",
                      {"AUDIO_ANALYSIS_HTTP_BODY_TIMEOUT_S": "2"}) as (base, _, store):
        job_id, size = _long_result(store, base)
        stalled, slow = _ask(base, job_id), _ask(base, job_id)
        # the slow client reads a little at a time, about 160 KB/s, for 4 timeouts; the stalled one nothing
        deadline = time.monotonic() + 8
        slow_got = 0
        while time.monotonic() < deadline:
            slow_got += len(slow.recv(16384))
            time.sleep(0.1)
        # before: the API held the whole result for the stalled client as long as it kept the
        # connection (40 such connections: 248 MB of the API); it is cut now, the rest of its
        # result dropped, where what the kernel had taken already still reaches it
        stalled_got = _read_to_end(stalled)
        assert stalled_got < size
        # the slow one was never cut: it reads the whole result
        assert slow_got + _read_to_end(slow) > size
