"""How long a queued job's record lives: while its job waits, runs, and after it ends.

Real processes throughout: the session's Redis, a Celery worker (solo pool, as `up` runs them)
and the API under uvicorn. Results are kept 3 s instead of a day, and the worker holds the first
diarization 4 s (tests/_held_engine_worker.py), so a job waits and runs longer than results are
kept on a machine of any speed.
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

from tests.conftest import api_under_uvicorn
from tests.test_service_redelivery import _ts

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


class TestRecordLifetime:
    """A record lives while its job waits and runs, and result_expires_s after it ends."""

    @pytest.fixture(scope="class")
    def held(self, service_env, tmp_path_factory) -> Iterator[Any]:
        base = tmp_path_factory.mktemp("lifetime")
        env = {"AUDIO_ANALYSIS_RESULT_EXPIRES_S": str(RESULTS_KEPT_S),
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
            # the second waited longer than results are kept, and ran
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
