"""A tenant's quota on unfinished work: one API key cannot fill the service for everyone.

Fair ordering only reorders; without a bound one key's runaway loop queued jobs until Redis hit
its maxmemory or the upload storage filled, and then every tenant was refused (503, 507). A
tenant may now have at most AUDIO_ANALYSIS_TENANT_MAX_UNFINISHED_JOBS jobs queued or running
(and AUDIO_ANALYSIS_TENANT_MAX_UNFINISHED_BYTES of uploads held for them): past it, 429 with
Retry-After, nothing of the request kept. Against the real API (in-process, and two uvicorn
processes racing), real Redis and the session's real worker; jobs meant to stay queued go to a
queue of their own that no worker consumes.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydantic import SecretStr

from tests.conftest import api_under_uvicorn

KEY_A, KEY_B, ADMIN = "quota-tenant-a", "quota-tenant-b", "quota-operator"


@pytest.fixture()
def parked(settings) -> Iterator[str]:
    """A queue nobody consumes: jobs sent there stay queued (each test's own). Its messages and
    waiting lists are dropped afterwards; the tests cancel their jobs, which deletes their uploads."""
    import redis

    from shared.queue import queue_keys

    queue = f"audio-quota-{uuid.uuid4().hex[:8]}"
    yield queue
    redis.Redis.from_url(settings.redis_url).delete(*queue_keys(queue))


@pytest.fixture()
def store(settings) -> Any:
    from shared.jobs import JobStore

    return JobStore.from_settings(settings)


def _submit(app: Any, key: str | None, audio: bytes, **headers: str) -> Any:
    return app.post("/jobs/embedding", files={"file": ("a.wav", audio, "audio/wav")},
                    headers={**({"X-API-Key": key} if key else {}), **headers})


def _accepted(app: Any, key: str | None, audio: bytes, **headers: str) -> str:
    r = _submit(app, key, audio, **headers)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def _assert_quota_refused(r: Any, limit: str = "JOBS") -> None:
    assert r.status_code == 429, r.text
    assert r.headers["Retry-After"] == "30"
    body = r.json()
    assert set(body) == {"detail", "error_type", "timestamp"}, body
    assert body["error_type"] == "ValidationError"
    assert f"AUDIO_ANALYSIS_TENANT_MAX_UNFINISHED_{limit}" in body["detail"], body


def _stored(settings: Any) -> set[str]:
    root = Path(settings.storage_dir)
    return {p.name for p in root.iterdir()} if root.exists() else set()


def _wait(app: Any, key: str, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = app.get(f"/jobs/{job_id}", headers={"X-API-Key": key}).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end within {timeout_s} s")


def _cancel(app: Any, key: str | None, job_ids: list[str]) -> None:
    for job_id in job_ids:
        app.post(f"/jobs/{job_id}/cancel", headers={"X-API-Key": key} if key else {})


def test_a_tenant_at_its_limit_gets_429_and_nothing_is_kept_while_another_still_gets_202(
        variant_app, settings, store, parked, utterances) -> None:
    """A's third job is refused before anything of it is stored (no upload, no record, no queue
    message); B, on the same service, is taken. A batch that would cross the limit is refused
    whole, and the refusals are counted in /metrics."""
    from api.deps import owner_of
    from shared.queue import queue_depth

    app = variant_app(queue_name=parked, api_keys=[SecretStr(KEY_A), SecretStr(KEY_B)],
                      tenant_max_unfinished_jobs=2)
    audio = utterances["spk1"][0].read_bytes()
    broker = store.redis
    a_jobs = [_accepted(app, KEY_A, audio) for _ in range(2)]
    b_jobs: list[str] = []
    try:
        stored, depth = _stored(settings), queue_depth(broker, parked)
        r = _submit(app, KEY_A, audio)
        _assert_quota_refused(r)
        assert "has 2 jobs queued or running" in r.json()["detail"] and "limit of 2" in r.json()["detail"]
        assert not _stored(settings) - stored, "the refused upload stayed in storage"
        assert queue_depth(broker, parked) == depth, "a message was sent for the refused job"
        assert {j.job_id for j in store.recent(10, owner=owner_of(KEY_A))} == set(a_jobs), "a record was kept"

        b_jobs.append(_accepted(app, KEY_B, audio))
        # B has one slot left: a batch of two would cross the limit, and is refused whole
        r = app.post("/jobs/batch", data={"kind": "embedding"}, headers={"X-API-Key": KEY_B},
                     files=[("files", (f"{i}.wav", audio, "audio/wav")) for i in range(2)])
        _assert_quota_refused(r)
        assert "these 2 jobs" in r.json()["detail"]
        assert _stored(settings) - stored == {b_jobs[0]}, "the refused batch's uploads stayed in storage"
        assert [j.job_id for j in store.recent(10, owner=owner_of(KEY_B))] == b_jobs
        assert store.unfinished(owner_of(KEY_B)) == (1, len(audio))
        # ... and one of one file fits
        r = app.post("/jobs/batch", data={"kind": "embedding"}, headers={"X-API-Key": KEY_B},
                     files=[("files", ("0.wav", audio, "audio/wav"))])
        assert r.status_code == 202, r.text
        b_jobs += [job["job_id"] for job in r.json()["jobs"]]

        metrics = app.get("/metrics").text
        refused = [line for line in metrics.splitlines() if line.startswith('audio_analysis_quota_refusals_total{limit="jobs"}')]
        assert refused and float(refused[0].split()[-1]) >= 2, refused
    finally:
        _cancel(app, KEY_A, a_jobs)
        _cancel(app, KEY_B, b_jobs)


def test_a_job_that_ends_frees_its_slot(variant_app, settings, store, parked, utterances) -> None:
    """Cancelled (queued, on a queue nobody consumes) or run to its end by the worker: the
    tenant's next job is taken. Before, nothing counted; now a slot that never came back would
    lock the tenant out."""
    from api.deps import owner_of

    audio = utterances["spk1"][0].read_bytes()
    app = variant_app(queue_name=parked, api_keys=[SecretStr(KEY_A)], tenant_max_unfinished_jobs=1)
    first = _accepted(app, KEY_A, audio)
    _assert_quota_refused(_submit(app, KEY_A, audio))
    _cancel(app, KEY_A, [first])
    second = _accepted(app, KEY_A, audio)
    _cancel(app, KEY_A, [second])
    assert store.unfinished(owner_of(KEY_A)) == (0, 0)

    # on the session's queue, where the real worker runs it
    running = variant_app(api_keys=[SecretStr(KEY_B)], tenant_max_unfinished_jobs=1)
    body = _wait(running, KEY_B, _accepted(running, KEY_B, audio))
    assert body["status"] == "succeeded", body
    assert store.unfinished(owner_of(KEY_B)) == (0, 0)
    _cancel(running, KEY_B, [_accepted(running, KEY_B, audio)])


def test_failed_given_up_and_expired_jobs_do_not_hold_a_slot(variant_app, settings, store, parked,
                                                             media_server, utterances) -> None:
    """Every way a job ends gives its slot back: failed by the worker (its audio URL answered
    404), given up by the recovery pass (its worker lost too often), and a record that expired
    while queued (its entry lapses with it). A slot kept by any of them would have locked a
    tenant with a limit of 1 out for good."""
    from api.deps import owner_of
    from shared.jobs import FAILED
    from shared.storage import get_storage
    from worker.recovery import recover_stalled_jobs

    owner = owner_of(KEY_A)
    audio = utterances["spk1"][0].read_bytes()

    # failed by the real worker (the session's queue)
    app = variant_app(api_keys=[SecretStr(KEY_A)], tenant_max_unfinished_jobs=1)
    r = app.post("/jobs/embedding", data={"file_url": media_server.url(f"/quota/{uuid.uuid4().hex}.wav")},
                 headers={"X-API-Key": KEY_A})
    assert r.status_code == 202, r.text
    assert _wait(app, KEY_A, r.json()["job_id"])["status"] == FAILED
    assert store.unfinished(owner) == (0, 0)

    # given up by the recovery pass: started, its lease gone, lost as often as allowed
    parked_app = variant_app(queue_name=parked, api_keys=[SecretStr(KEY_A)], tenant_max_unfinished_jobs=1)
    job = _accepted(parked_app, KEY_A, audio)
    _assert_quota_refused(_submit(parked_app, KEY_A, audio))
    store.mark_running(job)
    store.update(job, lambda r: r.model_copy(update={"lost": settings.job_max_attempts - 1}))
    assert recover_stalled_jobs(store, get_storage(settings), settings) == [job]
    assert store.get(job).status == FAILED
    assert store.unfinished(owner) == (0, 0)

    # expired while queued: records kept 2 s here; nothing ends the job, its record just goes
    short = variant_app(queue_name=parked, api_keys=[SecretStr(KEY_A)], tenant_max_unfinished_jobs=1,
                        result_expires_s=2, upload_expires_s=2)
    job = _accepted(short, KEY_A, audio)
    _assert_quota_refused(_submit(short, KEY_A, audio))
    deadline = time.monotonic() + 10
    while store.get(job) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.get(job) is None
    _cancel(short, KEY_A, [_accepted(short, KEY_A, audio)])
    get_storage(settings).delete_job(job)  # what the workers' sweep does after upload_expires_s


def test_an_idempotent_retry_is_answered_not_refused_by_the_quota_it_holds(variant_app, store, parked,
                                                                           utterances) -> None:
    """At its limit with one job, the tenant's retry of that job's request (same Idempotency-Key)
    gets the same job again, counted once; a new request is refused."""
    from api.deps import owner_of

    audio = utterances["spk1"][0].read_bytes()
    app = variant_app(queue_name=parked, api_keys=[SecretStr(KEY_A)], tenant_max_unfinished_jobs=1)
    key = {"Idempotency-Key": str(uuid.uuid4())}
    job = _accepted(app, KEY_A, audio, **key)
    try:
        r = _submit(app, KEY_A, audio, **key)
        assert r.status_code == 202, r.text
        assert r.json()["job_id"] == job and r.headers["Idempotent-Replayed"] == "true"
        assert store.unfinished(owner_of(KEY_A)) == (1, len(audio))
        _assert_quota_refused(_submit(app, KEY_A, audio, **{"Idempotency-Key": str(uuid.uuid4())}))
        _assert_quota_refused(_submit(app, KEY_A, audio))
    finally:
        _cancel(app, KEY_A, [job])


def test_the_uploads_bytes_limit(variant_app, settings, store, parked, utterances) -> None:
    """With AUDIO_ANALYSIS_TENANT_MAX_UNFINISHED_BYTES, a tenant's uploads held for its unfinished
    jobs stay under it; audio by URL, fetched by the worker, is not counted."""
    from api.deps import owner_of

    audio = utterances["spk1"][0].read_bytes()
    app = variant_app(queue_name=parked, api_keys=[SecretStr(KEY_A)], tenant_max_unfinished_jobs=0,
                      tenant_max_unfinished_bytes=len(audio) * 3 // 2)
    job = _accepted(app, KEY_A, audio)
    try:
        stored = _stored(settings)
        r = _submit(app, KEY_A, audio)
        _assert_quota_refused(r, "BYTES")
        assert not _stored(settings) - stored
        assert store.unfinished(owner_of(KEY_A)) == (1, len(audio))
    finally:
        _cancel(app, KEY_A, [job])
    _cancel(app, KEY_A, [_accepted(app, KEY_A, audio)])


def test_operator_keys_and_a_service_without_keys_are_held_to_it_too(variant_app, store, parked,
                                                                      utterances) -> None:
    """An admin key sees every tenant's jobs but is a tenant of its own for the quota: its runaway
    script fills Redis for everyone as any other would. Without API keys every job is one
    tenant's, so the limit is the service's."""
    audio = utterances["spk1"][0].read_bytes()
    app = variant_app(queue_name=parked, api_keys=[SecretStr(KEY_A)], admin_api_keys=[SecretStr(ADMIN)],
                      tenant_max_unfinished_jobs=1)
    job = _accepted(app, ADMIN, audio)
    _assert_quota_refused(_submit(app, ADMIN, audio))
    _cancel(app, KEY_A, [_accepted(app, KEY_A, audio)])
    _cancel(app, ADMIN, [job])

    # keys of its own: other tests' jobs of the one keyless tenant, ending meanwhile, stay apart
    prefix = f"aa-quota-{uuid.uuid4().hex[:8]}"
    keyless = variant_app(queue_name=parked, redis_key_prefix=prefix, tenant_max_unfinished_jobs=1)
    job = _accepted(keyless, None, audio)
    r = _submit(keyless, None, audio)
    _assert_quota_refused(r)
    assert r.json()["detail"].startswith("the service has 1 job queued or running")
    _cancel(keyless, None, [job])
    store.redis.delete(*store.redis.keys(f"{prefix}:*"))


def test_racing_creates_never_pass_the_limit(settings, store) -> None:
    """The check and the count are one step of Redis with the record (JobStore.create_queued):
    16 threads creating a tenant's jobs at once, with nothing checked before, make exactly 5."""
    from shared.errors import QuotaExceeded
    from shared.jobs import CANCELLED, JobRecord, Quota, new_job_id

    owner = f"race-{uuid.uuid4().hex[:8]}"
    start = threading.Barrier(16)
    made: list[str] = []

    def create(_: int) -> bool:
        start.wait()
        try:
            record, _level = store.create_queued(JobRecord(job_id=new_job_id(), kind="embedding", owner=owner,
                                                           queue=f"audio-quota-race-{owner}"), quota=Quota(5, 0))
        except QuotaExceeded:
            return False
        made.append(record.job_id)
        return True

    with ThreadPoolExecutor(16) as pool:
        taken = sum(pool.map(create, range(16)))
    assert taken == 5 and store.unfinished(owner) == (5, 0)
    for job_id in made:  # no message was sent: ended here, so the recovery pass has nothing to find
        store.finish(job_id, CANCELLED, unannounced=True)
        store.forget_unconfirmed(job_id)
    assert store.unfinished(owner) == (0, 0)


def test_two_api_processes_racing_take_no_more_than_the_limit(service_env, settings, store, parked, utterances,
                                                             tmp_path) -> None:
    """Two uvicorn processes, 24 submissions of one tenant at once split between them, a limit of
    5: exactly 5 are taken (202) and 19 refused (429), and no refused upload stays in storage."""
    import httpx

    from api.deps import owner_of

    audio = utterances["spk1"][0].read_bytes()
    env = {"AUDIO_ANALYSIS_QUEUE_NAME": parked, "AUDIO_ANALYSIS_TENANT_MAX_UNFINISHED_JOBS": "5"}
    for logs in ("one", "two"):
        (tmp_path / logs).mkdir()
    with api_under_uvicorn(service_env, tmp_path / "one", [KEY_A], env) as one, \
            api_under_uvicorn(service_env, tmp_path / "two", [KEY_A], env) as two:
        stored = _stored(settings)
        start = threading.Barrier(24)

        def submit(n: int) -> httpx.Response:
            start.wait()
            return httpx.post(f"{(one, two)[n % 2]}/jobs/embedding", headers={"X-API-Key": KEY_A},
                              files={"file": ("a.wav", audio, "audio/wav")}, timeout=60)

        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(submit, range(24)))
        codes = sorted(r.status_code for r in answers)
        taken = [r.json()["job_id"] for r in answers if r.status_code == 202]
        try:
            assert codes == [202] * 5 + [429] * 19, codes
            assert all(r.headers["Retry-After"] == "30" for r in answers if r.status_code == 429)
            assert store.unfinished(owner_of(KEY_A)) == (5, 5 * len(audio))
            assert _stored(settings) - stored == set(taken), "a refused upload stayed in storage"
        finally:
            for job_id in taken:
                httpx.post(f"{one}/jobs/{job_id}/cancel", headers={"X-API-Key": KEY_A}, timeout=30)


def test_a_submission_alone_past_the_limit_is_413_not_a_429_to_wait_out(variant_app, settings, store, parked,
                                                                          utterances) -> None:
    """A batch of more files than the tenant may have unfinished, or an upload larger than its
    bytes limit, can never fit however long it waits: it was answered 429 with Retry-After and
    "submit again once some of its jobs have ended", which a retrying client obeyed for ever. It
    is 413 now, without Retry-After, on an empty tenant, and nothing of it is kept."""
    from api.deps import owner_of

    audio = utterances["spk1"][0].read_bytes()
    app = variant_app(queue_name=parked, api_keys=[SecretStr(KEY_A)], tenant_max_unfinished_jobs=2,
                      tenant_max_unfinished_bytes=len(audio) * 5)
    stored = _stored(settings)
    r = app.post("/jobs/batch", data={"kind": "embedding"}, headers={"X-API-Key": KEY_A},
                 files=[("files", (f"{i}.wav", audio, "audio/wav")) for i in range(3)])
    assert r.status_code == 413 and "Retry-After" not in r.headers, (r.status_code, r.headers, r.text)
    assert "smaller batches" in r.json()["detail"] and r.json()["error_type"] == "ValidationError", r.text
    big = audio * 6  # a WAV whose header says less than its bytes: read as the first part, sized whole
    r = _submit(app, KEY_A, big)
    assert r.status_code == 413 and "Retry-After" not in r.headers, (r.status_code, r.text)
    assert "TENANT_MAX_UNFINISHED_BYTES" in r.json()["detail"], r.text
    assert not _stored(settings) - stored and store.unfinished(owner_of(KEY_A)) == (0, 0)
    # a batch within the limit is still taken
    r = app.post("/jobs/batch", data={"kind": "embedding"}, headers={"X-API-Key": KEY_A},
                 files=[("files", (f"{i}.wav", audio, "audio/wav")) for i in range(2)])
    assert r.status_code == 202, r.text
    _cancel(app, KEY_A, [job["job_id"] for job in r.json()["jobs"]])
