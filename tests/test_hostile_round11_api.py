"""An eleventh round of what a hostile client tried against the API, after the earlier rounds
(tests/test_hostile_*.py, test_security.py, test_tenant_quota.py, test_idempotency.py).

Each test fails on the code before its fix:

* a ``.npy`` embedding whose header declares a dimension past 2**63 (``'shape': (2**64,)``)
  was a 500 "internal server error" on ``POST /voiceprints/import``, ``/jobs/compare_embedding``
  and ``/compare_embedding``: numpy's int64 product of the shape raised OverflowError before the
  file was ever read (and a product past 2**63 wrapped round to a size that passed the check);
* ``GET /health`` and ``GET /metrics``, open without a key, each listed the workers with a SCAN
  of the whole Redis keyspace (every job record, every voiceprint: 200,000 keys took 2,000 round
  trips, a quarter of a second) in a thread of the pool every request shares. 80 anonymous calls
  at once held all 40 threads, and a client's poll of its job waited 9 s for one; now the calls
  that come in while a reading is being taken share it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, Iterator

import numpy as np
import pytest

from shared.embedding_file import load_embedding
from shared.errors import InputError

DIM = 192
PREFIX = "aa-round11"


@pytest.fixture(scope="module")
def own_settings(settings) -> Any:
    return settings.model_copy(update={"redis_key_prefix": PREFIX, "queue_name": "audio-round11",
                                       "webhook_queue_name": "webhooks-round11"})


@pytest.fixture(scope="module")
def bare_api(own_settings) -> Iterator[Any]:
    """The API in-process on the session's Redis under a key prefix of its own, no worker."""
    import redis
    from fastapi.testclient import TestClient

    from api.main import create_app

    r = redis.Redis.from_url(own_settings.redis_url)
    for key in r.scan_iter(match=f"{PREFIX}:*", count=1000):
        r.delete(key)
    with TestClient(create_app(own_settings), raise_server_exceptions=False) as client:
        yield client
    for key in r.scan_iter(match=f"{PREFIX}:*", count=1000):
        r.delete(key)
    r.delete("audio-round11", "webhooks-round11")


def _assert_documented(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "error_type", "timestamp"}, body
    return body


# --- a .npy header declaring more values than an int64 counts ------------------------------------
def _npy(shape: str, payload: bytes = b"\0" * (4 * DIM)) -> bytes:
    """A version 1.0 .npy file of float32 whose header declares ``shape`` (as its text)."""
    header = ("{'descr': '<f4', 'fortran_order': False, 'shape': %s, }" % shape).encode("latin-1")
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + payload


HUGE_SHAPES = {
    "past_int64": f"({2**64},)",
    "far_past_int64": f"({2**100},)",
    "negative_past_int64": f"({-2**70},)",
    "past_int64_times_zero": f"({2**64}, 0)",
    # 64 * (2**58 + 3) = 2**64 + 192: an int64 product wraps round to the expected 192
    "wrapping_to_192": f"(64, {2**58 + 3})",
    "two_negatives": "(-1, -192)",
}


@pytest.mark.parametrize("shape", list(HUGE_SHAPES.values()), ids=list(HUGE_SHAPES))
def test_a_npy_declaring_a_size_past_int64_is_refused_as_the_callers(shape: str) -> None:
    with pytest.raises(InputError) as refused:
        load_embedding(_npy(shape), "e.npy", dimension=DIM, allow_pickle=False)
    assert refused.value.status_code == 422
    assert "192" in refused.value.detail


def test_the_same_file_declaring_its_true_shape_still_loads() -> None:
    vector = np.arange(1, DIM + 1, dtype="<f4")
    loaded = load_embedding(_npy(f"({DIM},)", vector.tobytes()), "e.npy", dimension=DIM, allow_pickle=False)
    np.testing.assert_array_equal(loaded, vector)


def test_an_import_or_a_job_with_such_an_embedding_is_a_422_not_a_500(bare_api, own_settings) -> None:
    from shared.voiceprints import embedding_model

    bad = _npy(f"({2**64},)")
    model = embedding_model(own_settings).name
    imported = bare_api.post("/voiceprints/import", files={"file": ("v.npy", bad)},
                             data={"label": "Alice", "model": model})
    _assert_documented(imported, 422)
    # parsed at the edge, before any audio is looked at or stored: the audio need not be audio
    job = bare_api.post("/jobs/compare_embedding", files={"audio": ("a.wav", b"RIFF"), "embedding": ("e.npy", bad)})
    _assert_documented(job, 422)
    # and the API still serves the next request on it
    assert bare_api.get("/health").status_code in (200, 503)


# --- /health and /metrics, open without a key ----------------------------------------------------
class _CountingWorkers:
    """Stands in for JobStore.workers: a SCAN of a large keyspace (``delay_s``), counted."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> list[dict[str, Any]]:
        with self.lock:
            self.calls += 1
        time.sleep(self.delay_s)
        return [{"worker": "cpu@host:1", "diarization_model_loaded": True, "verification_model_loaded": True}]


def test_anonymous_health_and_metrics_calls_share_one_reading_of_the_store(own_settings, monkeypatch) -> None:
    import httpx

    from api.main import create_app

    app = create_app(own_settings)
    # a reading of 3 s: 80 of them in the 40 threads kept a poll waiting 3 s or more; the poll's
    # own time (under 0.01 s) grew past 1 s on a loaded host, so the bound is half the reading
    workers = _CountingWorkers(delay_s=3.0)
    monkeypatch.setattr(app.state.store, "workers", workers)
    job_id = "0" * 32

    async def scenario() -> tuple[list[httpx.Response], list[float]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
            anonymous = [asyncio.ensure_future(client.get(path)) for path in ("/health", "/metrics") * 40]
            await asyncio.sleep(0.05)
            # a client's poll meanwhile: its record is read in a thread of the same pool
            polls = []
            for _ in range(3):
                started = time.perf_counter()
                assert (await client.get(f"/jobs/{job_id}")).status_code == 404
                polls.append(time.perf_counter() - started)
            return await asyncio.gather(*anonymous), polls

    answers, polls = asyncio.run(scenario())
    assert all(a.status_code == 200 for a in answers), [a.status_code for a in answers]
    health = [a.json() for a in answers if a.request.url.path == "/health"]
    assert all(h["status"] == "healthy" and h["diarization_model_loaded"] for h in health)
    assert all(b"audio_analysis_workers 1.0" in a.content for a in answers if a.request.url.path == "/metrics")
    # 80 calls at once: one reading for /health and one for /metrics, not 80 of 1 s in the 40 threads the poll needs too
    assert workers.calls <= 4, workers.calls
    assert max(polls) < 1.5, polls


def test_a_call_after_an_answer_gets_a_reading_of_its_own(own_settings, monkeypatch) -> None:
    """Shared only by calls that come in together: a worker gone (or a job ended) is seen by the
    next call at once, not by one a while later."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    app = create_app(own_settings)
    workers = _CountingWorkers(delay_s=0.0)
    monkeypatch.setattr(app.state.store, "workers", workers)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/health").json()["status"] == "healthy"
        assert "audio_analysis_workers 1.0" in client.get("/metrics").text
        monkeypatch.setattr(app.state.store, "workers", lambda: [])
        assert client.get("/health").json()["status"] == "degraded"
        assert "audio_analysis_workers 0.0" in client.get("/metrics").text


def test_the_workers_are_listed_in_one_round_trip_however_many_keys_redis_holds(bare_api) -> None:
    """The root of the /health cost: the workers were found by a SCAN of the whole keyspace, a
    round trip per 100 keys (2,000 at 200,000 job records). Now each heartbeat also names its
    worker in an index, and the listing is one script: one round trip, with 20,000 other keys."""
    store = bare_api.app.state.store
    pipe = store.redis.pipeline(transaction=False)
    for i in range(20_000):
        pipe.set(store.key("job", f"{i:032x}"), "{}", ex=300)
    pipe.execute()
    # a job worker of the earlier release writes its record alone, and a webhook worker of this
    # one (the API's image, upgraded with it) does not make the index the truth: while no job
    # worker of this release heartbeats, the records are found by the SCAN, the old one's too
    store.redis.set(store.key("worker", "old@a:0"), json.dumps({"worker": "old@a:0"}), ex=30)
    store.heartbeat("webhooks@a:2", {"worker": "webhooks@a:2", "loads_models": False}, ttl_s=3)
    assert sorted(w["worker"] for w in store.workers()) == ["old@a:0", "webhooks@a:2"]
    store.heartbeat("gpu0@a:1", {"worker": "gpu0@a:1", "loads_models": True}, ttl_s=30)
    store.heartbeat("gone@a:3", {"worker": "gone@a:3"}, ttl_s=30)
    store.forget_worker("gone@a:3")  # a worker that stopped
    calls: list[Any] = []
    real = store.redis.execute_command

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return real(*args, **kwargs)

    store.redis.execute_command = counted
    try:
        listed = sorted(w["worker"] for w in store.workers())
        assert listed == ["gpu0@a:1", "webhooks@a:2"]
        assert len(calls) == 1, calls
        time.sleep(3.1)  # the webhook worker's heartbeat lapses: listed no more, out of the index
        assert [w["worker"] for w in store.workers()] == ["gpu0@a:1"]
    finally:
        del store.redis.execute_command
    assert store.redis.smembers(store.key("workers")) == {"gpu0@a:1"}
    # the job worker gone (a fleet rolled back): the mark lapses with its heartbeat, and the old
    # workers are found by the SCAN again
    store.forget_worker("gpu0@a:1")
    store.redis.pexpire(store.key("workers", "indexed"), 1)
    time.sleep(0.05)
    assert [w["worker"] for w in store.workers()] == ["old@a:0"]
