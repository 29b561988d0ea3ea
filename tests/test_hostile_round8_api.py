"""Hostile requests, round 8: races and requests against the API's own rules."""

from __future__ import annotations

import pytest

from tests.conftest import newest_job_ids


@pytest.fixture()
def racing_store(settings):
    """A JobStore whose next transaction on a record loses its race: another client ends the job
    (``racer``, called with the job id) between the record's read and its write, as a second
    cancel or the worker's result does."""
    from shared.jobs import JobStore

    store = JobStore.from_settings(settings)
    other = JobStore.from_settings(settings)
    racer: dict = {}
    real = store.update

    def update(job_id, change, also=None, **watching):
        def racing(record):
            decided = change(record)
            job = racer.pop("job", None)
            if job is not None:
                job(job_id)  # once, after the record was read: its write is refused, and retried
            return decided

        return real(job_id, racing, also, **watching)

    store.update = update  # type: ignore[method-assign]
    return store, other, racer


def _queued(store, *, running: bool = False):
    from shared.jobs import JobRecord, new_job_id

    record = store.create(JobRecord(job_id=new_job_id(), kind="diarize", filename="race.wav"))
    if running:
        record = store.mark_running(record.job_id)
    return record


def test_an_end_that_lost_its_race_is_not_taken_for_its_own(racing_store):
    """Two cancels of one job at once were both answered 200 (seen against the real API: 1 in
    25 tries of three concurrent cancels), and a worker's result that lost to a cancel was taken
    for a success: JobStore.finish kept the "changed" of its first try of the transaction, whose
    write Redis refused, when its retry found the job already ended. Each cancel also sent the
    webhook and counted the job among the finished once more."""
    from shared.jobs import CANCELLED, SUCCEEDED

    store, other, racer = racing_store
    for status in (CANCELLED, SUCCEEDED):
        job = _queued(store, running=True)
        counts = dict(store.finished_counts())
        racer["job"] = lambda job_id: other.finish(job_id, CANCELLED, notify=True)
        record, changed = store.finish(job.job_id, status, notify=True)
        assert not changed
        assert record is not None and record.status == CANCELLED and record.result is None
        # the job counted once among the finished, as the cancel that won
        after = store.finished_counts()
        assert sum(after.values()) - sum(counts.values()) == 1


def test_a_requeue_that_lost_its_race_to_an_end_says_so(racing_store):
    """A worker handing its job back (shutdown, out of memory) as the job is cancelled was told
    the job went back to the queue, a record that was cancelled."""
    from shared.jobs import CANCELLED

    store, other, racer = racing_store
    job = _queued(store, running=True)
    racer["job"] = lambda job_id: other.finish(job_id, CANCELLED)
    assert store.requeue(job.job_id, 1, lost=False) is None
    assert store.get(job.job_id).status == CANCELLED


@pytest.mark.parametrize("path,files,form,foreign", [
    # identify's threshold is `threshold`; diarization's is `identification_threshold`
    ("/jobs/identify", "file", {"voiceprints": "all", "identification_threshold": "0.9"}, "identification_threshold"),
    ("/jobs/embedding", "file", {"num_speakers": "2"}, "num_speakers"),
    ("/jobs/compare", ("file1", "file2"), {"exclusive": "true"}, "exclusive"),
    # the synchronous route answers the result itself: a webhook it takes would never be sent
    ("/diarize", "file", {"webhook_url": "http://127.0.0.1:9/hook"}, "webhook_url"),
    ("/jobs/diarize", "file", {"label": "Alice"}, "label"),
])
def test_a_field_of_another_route_is_refused_not_dropped(client, path, files, form, foreign):
    """A field the route does not read, sent to it, was dropped without a word and the job ran
    without it (POST /identify with identification_threshold=0.9 named speakers at the default
    threshold, as the batch route had before it refused such fields); now 422 naming it, before
    any job is queued. Names no route reads are left alone."""
    from tests.conftest import tone_wav

    uploads = [(name, (f"{name}.wav", tone_wav(), "audio/wav")) for name in ((files,) if isinstance(files, str) else files)]
    before = newest_job_ids(client)
    r = client.post(path, files=uploads, data=form)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"{foreign}: not a field of POST {path}")
    assert newest_job_ids(client) == before
    # what the route reads is still taken, and an unknown name is still ignored
    ok = client.post(path, files=uploads, data={**{k: v for k, v in form.items() if k != foreign}, "x_custom": "1"})
    assert ok.status_code != 422 or "voiceprints" in ok.text, ok.text


def test_an_interrupted_submission_that_a_worker_started_meanwhile_is_not_failed(racing_store):
    """The recovery pass fails a job whose submission was never confirmed (queued, never
    started); a worker that started it between the pass's read and its write made the pass's
    retry leave the job alone but still answer it as failed, and the pass deleted the running
    job's upload."""
    store, other, racer = racing_store
    job = _queued(store)
    racer["job"] = other.mark_running
    assert store.fail_interrupted(job.job_id) is None
    assert store.get(job.job_id).status == "running"


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_submission_confirmed_after_the_pass_listed_it_is_not_failed(racing_store, when):
    """The pass lists unconfirmed jobs, then fails them one by one. The API's confirmation (a
    ZREM of the mark, the record untouched) that came after the listing, before or during the
    pass's transaction on the record, did not stop it: the client was answered 202 for a job
    failed as interrupted the next moment, and its upload deleted."""
    store, other, racer = racing_store
    job = _queued(store)
    assert job.job_id in store.unconfirmed(older_than_s=-60)
    if when == "before":
        assert other.confirm_queued([job.job_id]) == []
    else:
        racer["job"] = lambda job_id: other.confirm_queued([job_id])
    assert store.fail_interrupted(job.job_id) is None
    assert store.get(job.job_id).status == "queued"
    assert job.job_id not in store.unconfirmed(older_than_s=-60)


@pytest.mark.parametrize("path", ["/jobs/{id}", "/jobs/{id}/result", "/batches/{id}", "/voiceprints/{id}"])
def test_a_404_does_not_echo_what_is_not_an_id(client, path):
    """A path's id of 8,000 characters (or with markup) was sent back whole in the 404's detail;
    it is echoed only where it looks like an id, and a well-formed unknown id still is."""
    long = "<b>" + "x" * 8000
    r = client.get(path.format(id=long))
    assert r.status_code == 404, r.text
    assert "xxxx" not in r.text and "<b>" not in r.text and len(r.content) < 400
    assert set(r.json()) == {"detail", "error_type", "timestamp"}
    unknown = "0" * 32 if not path.startswith("/voiceprints") else "vp_" + "0" * 32
    r = client.get(path.format(id=unknown))
    assert r.status_code == 404 and unknown in r.json()["detail"], r.text


def test_jobs_their_client_was_never_told_of_keep_no_webhook(settings):
    """A submission failed as interrupted (no 202 was given) and a refused batch's withdrawn job
    kept their webhook_url: a worker that later took the message found the job ended and sent
    its webhook, about a job id nobody was given."""
    from shared.jobs import CANCELLED, JobRecord, JobStore, new_job_id

    store = JobStore.from_settings(settings)
    hooked = {"webhook_url": "http://127.0.0.1:9/hook", "webhook_payload": "status"}
    interrupted = store.create(JobRecord(job_id=new_job_id(), kind="diarize", **hooked))
    failed = store.fail_interrupted(interrupted.job_id)
    assert failed is not None and failed.status == "failed"
    withdrawn = store.create(JobRecord(job_id=new_job_id(), kind="diarize", **hooked))
    record, changed = store.finish(withdrawn.job_id, CANCELLED, unannounced=True)
    assert changed and record.status == "cancelled"
    for job in (interrupted, withdrawn):
        stored = store.get(job.job_id)
        assert (stored.webhook_url, stored.webhook, stored.webhook_payload) == (None, None, None), stored
        assert store.webhook_due_at(job.job_id) is None


def test_progress_reads_no_clock(settings, monkeypatch):
    """Each progress report (several a second per running job) read the Redis clock, a round
    trip whose answer was thrown away; a change of status still reads it (the record's life)."""
    from shared.jobs import JobRecord, JobStore, new_job_id

    store = JobStore.from_settings(settings)
    job = store.create(JobRecord(job_id=new_job_id(), kind="diarize"))
    store.mark_running(job.job_id)
    reads = []
    real = store.clock
    monkeypatch.setattr(store, "clock", lambda: reads.append(1) or real())
    for n in range(10):
        store.set_progress(job.job_id, n / 10, "embeddings")
    assert reads == []
    store.finish(job.job_id, "succeeded", result={})
    assert reads
