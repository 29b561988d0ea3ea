"""Round 17 of what a hostile or careless client tried against the API's request handling, after
round 16 (tests/test_hostile_round16_api.py, tests/test_hostile_round16b_api.py). Each test fails
on the code before its fix:

* an API told to stop (SIGTERM: a rolling deploy, ``docker stop``) while a synchronous call waited
  for its job waited for that call, up to ``AUDIO_ANALYSIS_SYNC_TIMEOUT_S`` (an hour), so the
  orchestrator killed it (SIGKILL, 10 s after ``docker stop``, 30 s in Kubernetes) and the call's
  job ran on for nobody while its client, cut off, submitted it again: the audio ran twice. The
  API now waits ``AUDIO_ANALYSIS_HTTP_SHUTDOWN_GRACE_S`` for the requests in flight, then cancels
  the jobs of the synchronous calls still waiting (not one made with an ``Idempotency-Key``, whose
  retry is answered that job's result) and exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import drop_namespace, parked_store, tone_wav, wait_for_api

ERROR_KEYS = {"detail", "error_type", "timestamp"}


# --- an API told to stop while synchronous calls wait -------------------------------------------
@pytest.fixture
def stoppable_api(service_env, settings, tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen, Any]]:
    """The API under uvicorn (api.serve) with queues no worker consumes, so that a synchronous
    call's job stays queued and its call waits: (base URL, its process, its job store). Calls wait
    without a worker (sync_requires_live_worker off, as where workers scale from zero) for an hour,
    as the default timeout has them; a stop grace of 2 s."""
    from cli.launcher import Stack, free_port

    name = "r17stop"
    prefix, queues = f"aa-{name}", (f"audio-{name}", f"webhooks-{name}")
    env = {k: v for k, v in service_env.items() if not k.startswith("_")}
    env.update({
        "AUDIO_ANALYSIS_API_KEYS": json.dumps([]),
        "AUDIO_ANALYSIS_REDIS_KEY_PREFIX": prefix, "AUDIO_ANALYSIS_QUEUE_NAME": queues[0],
        "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": queues[1],
        "AUDIO_ANALYSIS_STORAGE_DIR": str(tmp_path_factory.mktemp(f"{name}-uploads")),
        "AUDIO_ANALYSIS_SYNC_REQUIRES_LIVE_WORKER": "false",
        "AUDIO_ANALYSIS_SYNC_TIMEOUT_S": "3600",
        "AUDIO_ANALYSIS_HTTP_SHUTDOWN_GRACE_S": "2",
    })
    stack = Stack(env={**os.environ, **env}, log_dir=tmp_path_factory.mktemp(f"{name}-api"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        proc = stack.start_api("127.0.0.1", port)
        wait_for_api(base, proc)
        yield base, proc, parked_store(settings, name)
    finally:
        stack.stop(timeout_s=5)
        drop_namespace(settings.redis_url, prefix, *queues)


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
