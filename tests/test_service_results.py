"""``GET /jobs/{id}/result?format=`` and ``exclusive`` end to end: API in-process, real Redis, the
real worker process, real speech (pyannote's two-speaker sample, which has overlapped speech).

A real diarization's result fetched as RTTM, SRT and WebVTT is read back by independent readers
(pyannote.database, ``srt``, ``webvtt-py``) into exactly the turns of its JSON."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from tests.conftest import wait_for_job, wav_without_samples
from tests.test_formats import read_rttm, read_srt, read_vtt

ERROR_KEYS = {"detail", "error_type", "timestamp"}


def _files(path) -> dict:
    return {"file": (path.name, path.read_bytes(), "audio/wav")}


@pytest.fixture(scope="module")
def diarized(client, sample_wav) -> dict[str, dict]:
    """The sample diarized twice by the worker: as usual, and with exclusive=true."""
    ids = {
        "regular": client.post("/jobs/diarize", files=_files(sample_wav)).json()["job_id"],
        "exclusive": client.post("/jobs/diarize", files=_files(sample_wav), data={"exclusive": "true"}).json()["job_id"],
    }
    done = {name: wait_for_job(client, job_id, timeout_s=300) for name, job_id in ids.items()}
    for record in done.values():
        assert record["status"] == "succeeded", record
    return done


def _turns(result: dict) -> list[tuple[float, float, str]]:
    return [(s["start"], s["end"], s["speaker"]) for s in result["diarization_results"]]


def _overlap(turns: list[tuple[float, float, str]]) -> float:
    """Seconds where two turns overlap (turns sorted by start)."""
    total, reach = 0.0, 0.0
    for start, end, _ in sorted(turns):
        total += max(0.0, min(end, reach) - start)
        reach = max(reach, end)
    return total


def _union(turns: list[tuple[float, float, str]]) -> float:
    total, reach = 0.0, 0.0
    for start, end, _ in sorted(turns):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


@pytest.mark.parametrize("which", ["regular", "exclusive"])
def test_a_real_diarization_reads_back_the_same_from_every_format(client, diarized, which):
    record = diarized[which]
    job_id, turns = record["job_id"], _turns(record["result"])
    assert len(turns) >= 4

    r = client.get(f"/jobs/{job_id}/result")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == record["result"] == client.get(f"/jobs/{job_id}/result", params={"format": "json"}).json()

    got = {}
    for fmt in ("rttm", "srt", "vtt"):
        r = client.get(f"/jobs/{job_id}/result", params={"format": fmt})
        assert r.status_code == 200, r.text
        assert r.headers["content-disposition"] == f'inline; filename="sample.{fmt}"'
        got[fmt] = r
    assert got["vtt"].headers["content-type"] == "text/vtt; charset=utf-8"
    assert got["srt"].headers["content-type"] == "application/x-subrip; charset=utf-8"
    assert got["rttm"].headers["content-type"] == "text/plain; charset=utf-8"
    assert got["vtt"].text.startswith("WEBVTT\n\n") and "<v SPEAKER_00>" in got["vtt"].text
    assert got["srt"].text.startswith("1\n00:00:")
    assert all(line.startswith("SPEAKER sample 1 ") for line in got["rttm"].text.splitlines())

    assert read_rttm(got["rttm"].text) == sorted(turns)
    assert read_srt(got["srt"].text) == turns
    assert read_vtt(got["vtt"].text) == turns


def test_exclusive_turns_never_overlap_and_cover_the_same_speech(diarized):
    regular, exclusive = _turns(diarized["regular"]["result"]), _turns(diarized["exclusive"]["result"])
    # the sample has overlapped speech, so the check below is not vacuous
    assert _overlap(regular) > 0.5, regular
    assert _overlap(exclusive) == 0.0, exclusive
    for (_, end, _), (start, _, _) in zip(exclusive, exclusive[1:]):
        assert end <= start
    # the same speakers under the same labels, and (nearly) the same speech, one voice at a time
    assert {s for *_, s in exclusive} == {s for *_, s in regular} == {"SPEAKER_00", "SPEAKER_01"}
    assert _union(exclusive) == pytest.approx(_union(regular), rel=0.03)
    assert diarized["exclusive"]["result"]["segments_count"] == len(exclusive)


def test_no_result_until_the_job_succeeded(client, long_sample, utterances):
    job_id = client.post("/jobs/diarize", files=_files(long_sample)).json()["job_id"]
    r = client.get(f"/jobs/{job_id}/result", params={"format": "srt"})
    assert r.status_code == 409 and set(r.json()) == ERROR_KEYS, r.text
    assert r.json()["error_type"] == "ValidationError" and "no result yet" in r.json()["detail"]
    assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    r = client.get(f"/jobs/{job_id}/result")
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]

    bad = client.post("/jobs/diarize", files={"file": ("x.wav", wav_without_samples(), "audio/wav")}).json()
    assert wait_for_job(client, bad["job_id"])["status"] == "failed"
    r = client.get(f"/jobs/{bad['job_id']}/result", params={"format": "vtt"})
    assert r.status_code == 409 and set(r.json()) == ERROR_KEYS and "failed" in r.json()["detail"]


def test_formats_the_kind_cannot_give_are_422(client, utterances):
    job_id = client.post("/jobs/embedding", files=_files(utterances["spk1"][0])).json()["job_id"]
    # the format is checked before the status: a queued embedding is already 422 for srt
    for fmt in ("rttm", "srt", "vtt"):
        r = client.get(f"/jobs/{job_id}/result", params={"format": fmt})
        assert r.status_code == 422 and set(r.json()) == ERROR_KEYS, r.text
        assert "not offered for embedding" in r.json()["detail"]
    r = client.get(f"/jobs/{job_id}/result", params={"format": "xml"})
    assert r.status_code == 422 and set(r.json()) == ERROR_KEYS
    done = wait_for_job(client, job_id)
    r = client.get(f"/jobs/{job_id}/result")
    assert r.status_code == 200 and r.json() == done["result"] and len(r.json()["embedding"]) == 192


def test_another_keys_job_has_no_result(worker, settings, utterances):
    from fastapi.testclient import TestClient

    from api.main import create_app

    key_a, key_b = "result-key-a-0123456789", "result-key-b-0123456789"
    keyed = settings.model_copy(update={"api_keys": [SecretStr(key_a), SecretStr(key_b)]})
    with TestClient(create_app(keyed), raise_server_exceptions=False, headers={"X-API-Key": key_a}) as http:
        b = {"X-API-Key": key_b}
        job_id = http.post("/jobs/embedding", files=_files(utterances["spk2"][0])).json()["job_id"]
        assert http.get(f"/jobs/{job_id}/result", headers=b).status_code == 404
        assert wait_for_job(http, job_id)["status"] == "succeeded"
        assert http.get(f"/jobs/{job_id}/result").status_code == 200
        # another key's finished job is answered exactly like an unknown one
        other, unknown = http.get(f"/jobs/{job_id}/result", headers=b), http.get("/jobs/nope/result", headers=b)
        assert other.status_code == unknown.status_code == 404 and set(other.json()) == ERROR_KEYS
        assert job_id in other.json()["detail"] and "nope" in unknown.json()["detail"]
        assert http.get(f"/jobs/{job_id}/result", headers={"X-API-Key": ""}).status_code == 401


# --- listings are summaries: no result bodies -----------------------------------------------------


def test_listings_carry_no_results_and_stay_small_with_many_finished_jobs(worker, settings, diarized):
    """GET /jobs (with and without status=) and GET /batches/{id} show each job without its result,
    pointing at GET /jobs/{id}/result: 100 finished diarizations of ~100 KB each listed as 10 MB."""
    from fastapi.testclient import TestClient

    from api.deps import owner_of
    from api.main import create_app
    from shared.jobs import SUCCEEDED, JobRecord, JobStore, new_job_id, utc_now

    key = "listing-key-0123456789"
    real = diarized["regular"]["result"]
    turns = (real["diarization_results"] * (2000 // len(real["diarization_results"]) + 1))[:2000]
    big = {**real, "diarization_results": turns, "segments_count": len(turns)}
    store = JobStore.from_settings(settings)
    batch_id, ids = new_job_id(), []
    for i in range(100):
        record = store.create(JobRecord(job_id=new_job_id(), kind="diarize", owner=owner_of(key),
                                        filename=f"meeting-{i}.wav", batch_id=batch_id if i < 50 else None))
        store.update(record.job_id, lambda r: r.model_copy(update={
            "status": SUCCEEDED, "result": big, "progress": 1.0, "started_at": utc_now(), "finished_at": utc_now()}))
        ids.append(record.job_id)
    keyed = settings.model_copy(update={"api_keys": [SecretStr(key)]})
    try:
        with TestClient(create_app(keyed), raise_server_exceptions=False, headers={"X-API-Key": key}) as http:
            full = [http.get(f"/jobs/{job_id}") for job_id in ids]  # what each item of a listing used to be
            assert all(r.status_code == 200 and r.json()["result"] == big for r in full)
            before = sum(len(r.content) for r in full)
            sizes = {}
            for name, path, params in [("list", "/jobs", {"limit": 100}),
                                       ("list status=", "/jobs", {"limit": 100, "status": "succeeded"}),
                                       ("list kind=", "/jobs", {"limit": 100, "kind": "diarize"}),
                                       ("batch", f"/batches/{batch_id}", {})]:
                r = http.get(path, params=params)
                assert r.status_code == 200, r.text
                jobs = r.json()["jobs"]
                assert len(jobs) == (50 if name == "batch" else 100)
                assert set(j["job_id"] for j in jobs) <= set(ids)
                for job in jobs:
                    assert "result" not in job, name
                    assert job["status"] == "succeeded" and job["kind"] == "diarize" and job["progress"] == 1.0
                    assert job["filename"].startswith("meeting-") and job["created_at"] and job["finished_at"]
                    assert "error" in job and job["error"] is None
                    assert job["status_url"].endswith(f"/jobs/{job['job_id']}")
                    assert job["result_url"] == job["status_url"] + "/result"
                sizes[name] = len(r.content)
                assert sizes[name] < 100_000, (name, sizes[name])  # ~550 bytes a job
            # the result is where the listing points
            first = http.get("/jobs", params={"limit": 1}).json()["jobs"][0]
            assert http.get(first["result_url"]).json() == big
            print(f"\nlisting 100 finished diarizations: {before} bytes of records before, now " +
                  ", ".join(f"{n} {s} bytes" for n, s in sizes.items()))
            assert before > 100 * max(sizes.values())
            # a job not yet succeeded has no result_url
            queued = store.create(JobRecord(job_id=new_job_id(), kind="diarize", owner=owner_of(key)))
            ids.append(queued.job_id)
            newest = http.get("/jobs", params={"limit": 1}).json()["jobs"][0]
            assert newest["job_id"] == queued.job_id and newest["status"] == "queued" and newest["result_url"] is None
    finally:
        for job_id in ids:
            store.redis.delete(store._job_key(job_id))
            store.redis.zrem(store.key("jobs"), job_id)


@pytest.mark.parametrize("filename, ascii_name, own_name", [
    ("Réunion d'équipe.wav", "R_union_d__quipe", "Réunion d'équipe"),
    # nothing of it is ASCII: the plain name falls back to the job's id
    ("会议记录.wav", None, "会议记录"),
    # a name that would end the header's quotes or field is only ever percent-encoded
    ("Q3 final; filename=x.exe\u202e.wav", "Q3_final__filename_x.exe", "Q3 final; filename=x.exe"),
])
def test_a_result_downloads_under_the_uploads_own_name(client, sample_wav, filename, ascii_name, own_name):
    """A result's ``Content-Disposition`` gives its upload's own name as ``filename*`` (RFC 6266,
    RFC 8187), as a browser saves it, beside the plain ASCII ``filename`` for clients that lack it.
    Before, a name in any other script was saved as the job's id (``会议记录.wav`` as
    ``<job id>.srt``) and accents as underscores. Read back by werkzeug's header parser (moto's
    server brings it), which prefers ``filename*`` as browsers do, and by Python's email parser
    for the plain ``filename``; bidi controls (U+202E) are never part of either."""
    from email.message import Message

    from werkzeug.http import parse_options_header

    job_id = client.post("/jobs/diarize", files={"file": (filename, sample_wav.read_bytes(), "audio/wav")},
                         data={"num_speakers": "2"}).json()["job_id"]
    assert wait_for_job(client, job_id, timeout_s=300)["status"] == "succeeded"
    r = client.get(f"/jobs/{job_id}/result", params={"format": "srt"})
    assert r.status_code == 200, r.text
    header = r.headers["content-disposition"]
    assert header.isascii() and "\r" not in header and "\n" not in header, header
    message = Message()
    message["content-disposition"] = header
    assert message.get_param("filename", header="content-disposition") == f"{ascii_name or job_id}.srt", header
    assert parse_options_header(header) == ("inline", {"filename": f"{own_name}.srt"}), header
