"""Storage, job-record transitions and webhook helpers on their own (real Redis, no worker)."""

from __future__ import annotations

import io
import os
import time

import pytest

from shared.errors import InputError
from shared.storage import LocalStorage, UploadTooLargeError
from shared import webhooks


class Trickle(io.RawIOBase):
    """A stream of unknown length (like a chunked upload), counting what was read."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        self.read_bytes += n
        return b"\0" * n


def test_storage_streams_and_stops_at_the_limit(tmp_path):
    storage = LocalStorage(tmp_path)
    key = storage.save("job1", "file", Trickle(3 * 1024 * 1024), max_bytes=4 * 1024 * 1024)
    assert storage.exists(key) and (tmp_path / "job1" / "file").stat().st_size == 3 * 1024 * 1024
    stream = Trickle(100 * 1024 * 1024)
    with pytest.raises(UploadTooLargeError) as info:
        storage.save("job2", "file", stream, max_bytes=2 * 1024 * 1024)
    assert info.value.status_code == 413
    # stopped reading soon after the limit, and left no partial file behind
    assert stream.read_bytes <= 3 * 1024 * 1024
    assert not any(p.is_file() for p in (tmp_path / "job2").iterdir())
    storage.delete_job("job1")
    assert not (tmp_path / "job1").exists()


def test_storage_keys_cannot_escape_the_root(tmp_path):
    storage = LocalStorage(tmp_path / "root")
    key = storage.save("../../etc", "../passwd", io.BytesIO(b"x"), max_bytes=10)
    with storage.local_path(key) as path:
        assert path.resolve().is_relative_to((tmp_path / "root").resolve())


def test_storage_sweep_removes_only_expired(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.save("old", "file", io.BytesIO(b"x"), max_bytes=10)
    storage.save("new", "file", io.BytesIO(b"x"), max_bytes=10)
    past = time.time() - 3600
    os.utime(tmp_path / "old", (past, past))
    assert storage.sweep(600) == 1
    assert not (tmp_path / "old").exists() and (tmp_path / "new").exists()


@pytest.fixture()
def store(service_env, settings):
    from shared.jobs import JobStore

    s = JobStore.from_settings(settings.model_copy(update={"redis_key_prefix": "aa-unit"}))
    yield s
    for key in s.redis.scan_iter(match="aa-unit:*"):
        s.redis.delete(key)


def test_terminal_status_is_never_overwritten(store):
    from shared.jobs import CANCELLED, RUNNING, SUCCEEDED, JobRecord

    store.create(JobRecord(job_id="j1", kind="embedding"))
    assert store.mark_running("j1").status == RUNNING
    record, changed = store.finish("j1", CANCELLED)
    assert changed and record.status == CANCELLED
    # the worker finishing afterwards changes nothing
    record, changed = store.finish("j1", SUCCEEDED, result={"x": 1})
    assert not changed and record.status == CANCELLED and record.result is None
    assert store.mark_running("j1").status == CANCELLED
    assert store.set_progress("j1", 0.5, "segmentation").progress == 0.0
    assert store.finished_counts() == {("embedding", "cancelled"): 1}


def test_job_list_is_newest_first_and_filtered(store):
    from shared.jobs import SUCCEEDED, JobRecord

    for i in range(5):
        store.create(JobRecord(job_id=f"j{i}", kind="diarize" if i % 2 else "embedding"))
        time.sleep(0.002)
    store.mark_running("j3")
    store.finish("j3", SUCCEEDED, result={})
    assert [r.job_id for r in store.recent(3)] == ["j4", "j3", "j2"]
    assert [r.job_id for r in store.recent(10, kind="diarize")] == ["j3", "j1"]
    assert [r.job_id for r in store.recent(10, status="succeeded")] == ["j3"]
    assert store.count_by_status()["queued"] == 4


def test_webhook_signature_and_url_policy():
    body = b'{"job_id":"x"}'
    ts = str(int(time.time()))
    sig = webhooks.sign("k", ts, body)
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert webhooks.verify("k", ts, body, sig)
    assert not webhooks.verify("k", ts, body + b" ", sig)
    assert not webhooks.verify("k", str(int(ts) - 3600), body, webhooks.sign("k", str(int(ts) - 3600), body))
    # (no DNS here: the address policy is tested in test_security.py)
    assert webhooks.validate_webhook_url("https://hooks.example/x", ["HOOKS.example"], allow_private=True)
    for bad, allowed in (("ftp://a/b", []), ("/relative", []), ("http://evil.example/", ["hooks.example"])):
        with pytest.raises(InputError):
            webhooks.validate_webhook_url(bad, allowed, allow_private=True)


def test_a_recovered_job_goes_back_to_the_queue_it_was_sent_to(service_env, settings):
    """A worker of another pool (another queue) that finds a job with a lapsed lease puts it back
    on the job's own queue, not on its own: otherwise a CPU worker would take a GPU job, and a
    job would change pools behind its workers' backs."""
    import json as _json

    import redis

    from shared.jobs import JobRecord, JobStore, new_job_id
    from shared.storage import LocalStorage
    from worker.recovery import recover_stalled_jobs

    store = JobStore.from_settings(settings)
    client = redis.Redis.from_url(settings.redis_url)
    queue = "audio-elsewhere"
    client.delete(queue)
    job_id = new_job_id()
    store.create(JobRecord(job_id=job_id, kind="embedding", queue=queue))
    assert store.mark_running(job_id) is not None  # running, and no lease: its worker is gone
    handled = recover_stalled_jobs(store, LocalStorage(settings.storage_dir), settings)
    assert job_id in handled
    assert store.get(job_id).status == "queued"
    messages = [_json.loads(m) for m in client.lrange(queue, 0, -1)]
    assert [m["headers"]["id"] for m in messages] == [job_id]
    assert not any(job_id.encode() in m for m in client.lrange(settings.queue_name, 0, -1))
    client.delete(queue)
