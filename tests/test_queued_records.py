"""Queued jobs' records: a submission cut off between its record and its queue message, and how
long a record lives while its job waits, runs and after it ends.

Real processes throughout: the session's Redis, Celery workers (solo pool, as `up` runs them)
whose recovery pass runs every second with a submission grace of 1 s (60 s by default), and the
API under uvicorn. An API that dies mid-submission is the real one, ended at that one point
(tests/_interrupted_submit_api.py). For the lifetimes, results are kept 3 s instead of a day, and
the worker holds the first diarization 4 s (tests/_held_engine_worker.py), so a job waits and
runs longer than results are kept on a machine of any speed.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import api_under_uvicorn, gone
from tests.test_service_redelivery import _ts

GRACE_ENV = {"AUDIO_ANALYSIS_JOB_SUBMIT_GRACE_S": "1", "AUDIO_ANALYSIS_JOB_RECOVERY_INTERVAL_S": "1"}
RESULTS_KEPT_S = 3
HOLD_S = 4


def _start_worker(base: Path, name: str, queue: str, env: dict[str, str], module: str | None = None) -> Iterator[Any]:
    """A solo worker consuming ``queue`` (Celery's, or ``module`` run as ``python -m``), once it
    heartbeats (with its models loaded, if it loads them)."""
    from cli.launcher import Stack, wait_until
    from shared.jobs import JobStore
    from shared.settings import Settings

    stack = Stack(log_dir=base)
    if module is None:
        proc = stack.start_worker(queues=[queue], name=name, env=env)
    else:
        proc = stack.spawn(name, [
            sys.executable, "-m", module, "--pool", "solo", "--concurrency", "1", "-Q", queue, "-n", f"{name}@%h",
            "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        ], env=env)
    store = JobStore.from_settings(Settings())
    loads = env.get("AUDIO_ANALYSIS_WORKER_LOAD_MODELS") != "false"

    def up() -> bool:
        return any(w["worker"].startswith(f"{name}@") and (w.get("diarization_model_loaded") or not loads)
                   for w in store.workers())

    try:
        wait_until(up, 180, f"worker {name}", proc)
        yield SimpleNamespace(proc=proc, name=f"{name}@{socket.gethostname()}", queue=queue, log=base / f"{name}.log")
    finally:
        stack.stop()


def _store(settings: Any):
    from shared.jobs import JobStore

    return JobStore.from_settings(settings)


def _newest_job(store: Any, key: str, since: float) -> Any:
    """The job the dead API was making for ``key``'s tenant: its client was never told its id."""
    from api.deps import owner_of

    [record] = [r for r in store.recent(10, owner=owner_of(key)) if r.created_ts >= since]
    return record


def _wait_for_status(store: Any, job_id: str, status: str, timeout_s: float = 20) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = store.get(job_id)
        if record is not None and record.status == status:
            return record
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not {status} within {timeout_s} s: {store.get(job_id)}")


def _upload(settings: Any, job_id: str) -> Path:
    return Path(settings.storage_dir) / job_id


def _wait_for_log(worker: Any, text: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while text not in (log := worker.log.read_text(errors="replace")):
        assert time.monotonic() < deadline, log[-3000:]
        time.sleep(0.1)
    return log


def _assert_interrupted(record: Any) -> None:
    from shared.jobs import INTERRUPTED_SUBMISSION

    assert record.status == "failed", record
    assert record.error.detail == INTERRUPTED_SUBMISSION, record.error
    assert record.error.error_type == "ModelError" and record.error.status_code == 503, record.error
    # never run
    assert record.attempts == 0 and record.started_at is None, record


class TestInterruptedSubmission:
    """Submissions cut off between their record and their message fail, and never run."""

    @pytest.fixture(scope="class")
    def rescuer(self, service_env, tmp_path_factory) -> Iterator[Any]:
        # no models: its recovery pass is all it is here for, and a job that has ended is skipped
        # without them
        env = {**GRACE_ENV, "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false"}
        yield from _start_worker(tmp_path_factory.mktemp("rescuer"), "rescuer", "audio-queued-records-rescuer", env)

    def test_a_submission_cut_off_before_its_message_fails_and_its_upload_goes(
            self, rescuer, service_env, settings, short_sample, tmp_path):
        """The API died between writing the record and sending its message: the record said
        "queued" for a day, in its tenant's listing, and its upload stayed. It is failed after
        job_submit_grace_s, saying to submit it again, and its upload deleted."""
        key = "queued-records-before-0123456789"
        store, since = _store(settings), time.time()
        env = {"INTERRUPT_SUBMIT": "before-send", "AUDIO_ANALYSIS_QUEUE_NAME": "audio-queued-records-nobody"}
        with api_under_uvicorn(service_env, tmp_path, [key], env, module="tests._interrupted_submit_api") as base:
            with pytest.raises(httpx.TransportError):  # no answer: the process is gone
                httpx.post(f"{base}/jobs/diarize", headers={"X-API-Key": key}, timeout=60,
                           files={"file": (short_sample.name, short_sample.read_bytes(), "audio/wav")})
        job = _newest_job(store, key, since)
        failed = _wait_for_status(store, job.job_id, "failed")
        _assert_interrupted(failed)
        assert failed.finished_ts - job.created_ts >= 1.0  # not before the grace (GRACE_ENV)
        assert gone(_upload(settings, job.job_id)), "the interrupted job's upload stayed"
        assert job.job_id not in store.unconfirmed(0.0)

    def test_a_submission_cut_off_after_its_message_is_failed_and_its_message_skipped(
            self, rescuer, service_env, settings, short_sample, tmp_path):
        """The API died once the message was sent, before its 202: the client submits again, so
        the first job must not run as well. It is failed while its message waits in the queue,
        and the worker that takes the message skips it."""
        from shared.queue import make_celery

        key = "queued-records-after-0123456789"
        late = "audio-queued-records-late"
        store, since = _store(settings), time.time()
        store.redis.delete(late)
        env = {"INTERRUPT_SUBMIT": "after-send", "AUDIO_ANALYSIS_QUEUE_NAME": late}
        with api_under_uvicorn(service_env, tmp_path, [key], env, module="tests._interrupted_submit_api") as base:
            with pytest.raises(httpx.TransportError):
                httpx.post(f"{base}/jobs/diarize", headers={"X-API-Key": key}, timeout=60,
                           files={"file": (short_sample.name, short_sample.read_bytes(), "audio/wav")})
        job = _newest_job(store, key, since)
        # its message is in the queue, waiting for a worker
        assert [json.loads(m)["headers"]["id"] for m in store.redis.lrange(late, 0, -1)] == [job.job_id]
        _assert_interrupted(_wait_for_status(store, job.job_id, "failed"))
        assert gone(_upload(settings, job.job_id))
        # a worker takes the message now
        celery = make_celery(settings)
        celery.control.add_consumer(late, destination=[rescuer.name], reply=True, timeout=5)
        try:
            _wait_for_log(rescuer, f"job {job.job_id} already failed: redelivered copy skipped")
        finally:
            celery.control.cancel_consumer(late, destination=[rescuer.name], reply=True, timeout=5)
        assert store.redis.llen(late) == 0
        _assert_interrupted(store.get(job.job_id))

    def test_a_message_an_idle_worker_took_before_the_api_died_is_not_run(
            self, rescuer, service_env, settings, short_sample, tmp_path):
        """The API died once the message was sent, and an idle worker took the message at once,
        before the API could confirm the job (the usual case: a worker waits on its queue). It
        ran the job, which its client, told nothing, submits again. Now the worker waits for the
        confirmation, which never comes, and the job is failed, not run."""
        key = "queued-records-taken-0123456789"
        store, since = _store(settings), time.time()
        env = {"INTERRUPT_SUBMIT": "after-send", "AUDIO_ANALYSIS_QUEUE_NAME": rescuer.queue}
        with api_under_uvicorn(service_env, tmp_path, [key], env, module="tests._interrupted_submit_api") as base:
            with pytest.raises(httpx.TransportError):
                httpx.post(f"{base}/jobs/diarize", headers={"X-API-Key": key}, timeout=60,
                           files={"file": (short_sample.name, short_sample.read_bytes(), "audio/wav")})
        job = _newest_job(store, key, since)
        _assert_interrupted(_wait_for_status(store, job.job_id, "failed"))
        assert gone(_upload(settings, job.job_id))
        log = _wait_for_log(rescuer, f"job {job.job_id} already failed: redelivered copy skipped")
        assert not [line for line in log.splitlines() if job.job_id in line and "job started" in line]
        assert store.redis.llen(rescuer.queue) == 0

    def test_a_broker_that_refuses_the_message_is_a_503_and_leaves_no_queued_job(
            self, service_env, settings, short_sample, tmp_path):
        """The broker answered the send with an error (here: the queue's key holds something
        else, so Redis refuses the push): the client gets a 503 in the documented shape with
        Retry-After, and the record is failed with the same words as an interrupted submission
        (not the broker's), its upload deleted."""
        key = "queued-records-broker-0123456789"
        broken = "audio-queued-records-broken"
        store, since = _store(settings), time.time()
        store.redis.set(broken, "not a queue")
        try:
            with api_under_uvicorn(service_env, tmp_path, [key], {"AUDIO_ANALYSIS_QUEUE_NAME": broken}) as base:
                r = httpx.post(f"{base}/jobs/diarize", headers={"X-API-Key": key}, timeout=60,
                               files={"file": (short_sample.name, short_sample.read_bytes(), "audio/wav")})
                assert r.status_code == 503, r.text
                assert set(r.json()) == {"detail", "error_type", "timestamp"}, r.json()
                assert r.json()["error_type"] == "ModelError" and r.headers["Retry-After"], r.headers
                assert "WRONGTYPE" not in r.text
                job = _newest_job(store, key, since)
                _assert_interrupted(job)
                listed = httpx.get(f"{base}/jobs", headers={"X-API-Key": key}).json()["jobs"]
                assert [j["status"] for j in listed if j["job_id"] == job.job_id] == ["failed"]
        finally:
            store.redis.delete(broken)
        assert gone(_upload(settings, job.job_id))
        assert job.job_id not in store.unconfirmed(0.0)


class TestRecordLifetime:
    """A record lives while its job waits and runs, and result_expires_s after it ends."""

    @pytest.fixture(scope="class")
    def held(self, service_env, tmp_path_factory) -> Iterator[Any]:
        base = tmp_path_factory.mktemp("lifetime")
        env = {**GRACE_ENV, "AUDIO_ANALYSIS_RESULT_EXPIRES_S": str(RESULTS_KEPT_S),
               "HELD_ENGINE_MARKER": str(base / "held"), "HELD_ENGINE_HOLD_S": str(HOLD_S)}
        yield from _start_worker(base, "lifetime", "audio-queued-records-lifetime", env,
                                 module="tests._held_engine_worker")

    def test_a_result_is_kept_after_its_job_ends_however_long_it_waited_and_ran(
            self, held, service_env, settings, short_sample, tmp_path):
        """A batch of two: the first runs past its creation plus result_expires_s (held), the
        second waits that long in the queue behind it. Counted from creation, both records
        expired midway (a 404 for a job that then ran, or ran for nobody), the batch's list with
        them, and the listing's index was trimmed of them by the next submission. Now each lives
        while its job waits and runs, and result_expires_s after it ends; the values kept apart
        and the index live at least as long."""
        key = "queued-records-lifetime-0123456789"
        store = _store(settings)
        env = {"AUDIO_ANALYSIS_QUEUE_NAME": "audio-queued-records-lifetime",
               "AUDIO_ANALYSIS_RESULT_EXPIRES_S": str(RESULTS_KEPT_S)}
        wav = (short_sample.name, short_sample.read_bytes(), "audio/wav")
        with api_under_uvicorn(service_env, tmp_path, [key], env) as base, \
                httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=60) as http:
            vector = json.dumps([1.0] + [0.0] * 191).encode()
            vp = http.post("/voiceprints/import", files={"file": ("v.json", vector, "application/json")},
                           data={"label": "Nobody", "model": "3d-speaker/campplus-cn-en-common"}).json()
            r = http.post("/jobs/batch", files=[("files", wav), ("files", wav)],
                          data={"kind": "diarize", "voiceprints": vp["id"]})
            assert r.status_code == 202, r.text
            batch_id, (first, second) = r.json()["batch_id"], [j["job_id"] for j in r.json()["jobs"]]
            created = store.get(first).created_ts
            records = {job_id: store.key("job", job_id) for job_id in (first, second)}

            # past creation + result_expires_s: the first still runs, the second still waits
            statuses: dict[str, set[str]] = {first: set(), second: set()}
            while time.time() < created + RESULTS_KEPT_S + 1.0:
                for job_id in (first, second):
                    got = http.get(f"/jobs/{job_id}")
                    assert got.status_code == 200, (job_id, time.time() - created, got.text)
                    statuses[job_id].add(got.json()["status"])
                time.sleep(0.1)
            assert "running" in statuses[first] and statuses[second] == {"queued"}, statuses
            assert http.get(f"/jobs/{first}").json()["status"] == "running", "the hold ended early"
            # running: its record outlives a whole attempt (hours), queued: the day it may wait
            assert store.redis.pttl(records[first]) > 3 * 3600 * 1000
            assert store.redis.pttl(records[second]) > 23 * 3600 * 1000
            assert http.get(f"/batches/{batch_id}").status_code == 200
            # the next submission trims the listing's index: both stay listed
            third = http.post("/jobs/embedding", files={"file": wav}).json()["job_id"]
            listed = [j["job_id"] for j in http.get("/jobs", params={"limit": 3}).json()["jobs"]]
            assert listed == [third, second, first], listed

            ended: dict[str, Any] = {}
            deadline = time.monotonic() + 180
            while len(ended) < 2:
                assert time.monotonic() < deadline, {j: store.get(j) for j in records}
                for job_id in set(records) - set(ended):
                    got = http.get(f"/jobs/{job_id}")
                    assert got.status_code == 200, (job_id, got.text)
                    if got.json()["status"] not in ("queued", "running"):
                        # kept result_expires_s from its end, not from its creation
                        ended[job_id] = (got.json(), store.redis.pttl(records[job_id]))
                time.sleep(0.05)
            for job_id, (body, left_ms) in ended.items():
                assert body["status"] == "succeeded", body
                assert 0 < left_ms <= RESULTS_KEPT_S * 1000, (job_id, left_ms)
                assert _ts(body["finished_at"]) > created + RESULTS_KEPT_S, body
            # the second waited longer than results are kept, and than a submission's grace, and ran
            assert _ts(ended[second][0]["started_at"]) - created > RESULTS_KEPT_S
            # the vectors it ran with outlive the records that name them
            (digest,) = store.get(second).kept_apart.values()
            values = [store.key("value", d) for d in [digest, *json.loads(store.redis.get(store.key("value", digest)))]]
            assert min(store.redis.pttl(v) for v in values) > max(store.redis.pttl(k) for k in records.values())
            assert ended[second][0]["result"]["identification"]["voiceprints"] == 1

            # and then it goes: result_expires_s after the end
            last = max(_ts(body["finished_at"]) for body, _ in ended.values())
            time.sleep(max(0.0, last + RESULTS_KEPT_S + 0.5 - time.time()))
            for job_id in records:
                assert http.get(f"/jobs/{job_id}").status_code == 404
            assert http.delete(f"/voiceprints/{vp['id']}").status_code == 204
