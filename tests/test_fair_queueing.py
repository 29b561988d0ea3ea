"""Fair ordering between tenants: a tenant's backlog does not make every other tenant's job wait.

A new job's Celery message gets a priority that grows with how many jobs its tenant already has
waiting (shared/queue.py, fair_priority); kombu's Redis transport keeps each priority in a list
of its own and a worker takes the lowest first. Against the real API, Redis and a real worker:
tenant A queues a backlog and tenant B one job on a queue nobody consumes yet, then a worker
starts on it and B's job is among the first to run, while A's jobs keep their order.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from pydantic import SecretStr

from tests.conftest import wait_for_job

KEY_A, KEY_B = "fair-tenant-a", "fair-tenant-b"
BACKLOG = 8


def _ts(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def _drop(broker: Any, settings: Any, queue: str) -> None:
    from shared.queue import queue_keys

    broker.delete(*queue_keys(queue))


def test_priority_grows_by_doublings_of_the_backlog_and_is_capped() -> None:
    from shared.queue import fair_priority

    assert [fair_priority(n) for n in (0, 1, 2, 3, 4, 7, 8, 1000)] == [0, 1, 2, 2, 3, 3, 3, 3]
    assert fair_priority(1000, 6) == 5 and fair_priority(3, 2) == 1


def test_the_levels_are_kombus_default_steps() -> None:
    """A worker of an earlier release sets no priority steps and listens on kombu's default four
    lists; each level's list is one of them, so an API upgraded first sends nothing such a worker
    cannot take (with steps 0-5 of its own, levels 1, 2, 4 and 5 waited in lists it never read)."""
    from kombu.transport.redis import Channel

    from shared.queue import PRIORITY_STEPS, make_celery, queue_keys

    assert list(PRIORITY_STEPS) == list(Channel.priority_steps) == [0, 3, 6, 9]
    assert make_celery().conf.broker_transport_options["priority_steps"] == list(Channel.priority_steps)
    assert queue_keys("audio") == ["audio", "audio\x06\x163", "audio\x06\x166", "audio\x06\x169"]


def test_a_tenants_levels_never_go_down_while_it_has_jobs_waiting(settings) -> None:
    """Counted alone, a new job whose older siblings still wait at level 3 would get level 1 once
    the jobs ahead of them started, and overtake them: its level stays the last one given until
    the tenant has none waiting. Another tenant, and another queue, start from 0."""
    from shared.jobs import JobRecord, JobStore

    store = JobStore.from_settings(settings)
    queue = f"audio-fair-unit-{uuid.uuid4().hex[:8]}"

    made: list[str] = []

    def new(owner: str | None, on: str = queue) -> tuple[str, int]:
        record, level = store.create_queued(JobRecord(job_id=uuid.uuid4().hex, kind="embedding", owner=owner, queue=on))
        made.append(record.job_id)
        return record.job_id, level

    try:
        _levels_of(store, new, queue)
    finally:
        # no message was sent for these records: nothing for the workers' recovery pass to find
        for job_id in made:
            store.redis.delete(store.key("job", job_id))
            store.forget_running(job_id)
            store.forget_unconfirmed(job_id)


def _levels_of(store: Any, new: Any, queue: str) -> None:
    from shared.jobs import JobRecord

    a = [new("a") for _ in range(BACKLOG)]
    assert [level for _, level in a] == [0, 1, 2, 2, 3, 3, 3, 3]
    assert new("b")[1] == 0 and new(None)[1] == 0 and new("a", queue + "-other")[1] == 0
    for job_id, _ in a[:6]:  # six of A's jobs start: two still wait, at level 3
        store.mark_running(job_id)
    assert store.waiting_count(JobRecord(job_id=a[0][0], kind="embedding", owner="a", queue=queue)) == 2
    later = new("a")
    assert later[1] == 3, "below its older siblings' level, it would overtake them"
    for job_id, _ in [*a[6:], later]:
        store.mark_running(job_id)
    # none of A's jobs waits any more: A starts again from 0
    assert new("a")[1] == 0


def test_queue_depth_counts_every_priority_list(variant_app, settings) -> None:
    """/metrics' audio_analysis_queue_depth adds up all of a queue's priority lists, which are
    the lists kombu puts the messages in (shared/queue.py, queue_keys)."""
    import redis

    from shared.kinds import KINDS
    from shared.queue import PRIORITY_STEPS, make_celery, queue_keys, send_job

    queue = f"audio-fair-depth-{uuid.uuid4().hex[:8]}"
    broker = redis.Redis.from_url(settings.redis_url)
    app = variant_app(queue_name=queue)
    celery = make_celery(settings)
    try:
        for level in range(len(PRIORITY_STEPS)):
            send_job(celery, KINDS["embedding"], uuid.uuid4().hex, queue, level)
        assert [broker.llen(key) for key in queue_keys(queue)] == [1] * len(PRIORITY_STEPS)
        metrics = app.get("/metrics").text
        line = f'audio_analysis_queue_depth{{queue="{queue}"}} {float(len(PRIORITY_STEPS))}'
        assert line in metrics, [m for m in metrics.splitlines() if m.startswith("audio_analysis_queue_depth")]
    finally:
        _drop(broker, settings, queue)


def test_another_tenants_job_overtakes_a_backlog(variant_app, client, settings, utterances, tmp_path) -> None:
    """Tenant A queues 8 jobs, then tenant B one; a worker then starts on the queue. First in
    first out, B's job ran 9th; now it runs 2nd (A's first job, queued before it at the same
    priority 0, goes first), and A's jobs run in the order they were submitted."""
    import redis

    from cli.launcher import Stack, wait_until
    from shared.jobs import JobStore
    from shared.queue import queue_depth

    queue = f"audio-fair-{uuid.uuid4().hex[:8]}"
    broker = redis.Redis.from_url(settings.redis_url)
    store = JobStore.from_settings(settings)
    app = variant_app(queue_name=queue, api_keys=[SecretStr(KEY_A), SecretStr(KEY_B)])
    audio = utterances["spk1"][0].read_bytes()

    def submit(key: str) -> str:
        r = app.post("/jobs/embedding", files={"file": ("a.wav", audio, "audio/wav")}, headers={"X-API-Key": key})
        assert r.status_code == 202, r.text
        return r.json()["job_id"]

    stack = Stack(log_dir=tmp_path)
    try:
        a_jobs = [submit(KEY_A) for _ in range(BACKLOG)]
        b_job = submit(KEY_B)
        assert queue_depth(broker, queue) == BACKLOG + 1
        assert broker.llen(queue) == 2, "priority 0: A's first job and B's only one"

        proc = stack.start_worker(queues=[queue], name="fair")
        wait_until(lambda: any(w["worker"].startswith("fair@") and w.get("verification_model_loaded")
                               for w in store.workers()), 180, "worker on the fair queue", proc)
        done = {job_id: wait_for_job(client, job_id, timeout_s=120) for job_id in [*a_jobs, b_job]}
        assert all(job["status"] == "succeeded" for job in done.values()), done
        order = sorted(done, key=lambda job_id: _ts(done[job_id]["started_at"]))
        b_at = order.index(b_job)
        assert b_at == 1, f"B's job ran at position {b_at + 1} of {BACKLOG + 1}"
        assert [job_id for job_id in order if job_id != b_job] == a_jobs, "A's jobs out of their order"
        assert queue_depth(broker, queue) == 0
        assert store.waiting_count(store.get(a_jobs[0])) == 0 and store.waiting_count(store.get(b_job)) == 0
    finally:
        stack.stop()
        _drop(broker, settings, queue)
