"""``GET /jobs/{id}/result?format=`` and ``exclusive`` end to end: API in-process, real Redis, the
real worker process, real speech (pyannote's two-speaker sample, which has overlapped speech).

A real diarization's result fetched as RTTM, SRT and WebVTT is read back by independent readers
(pyannote.database, ``srt``, ``webvtt-py``) into exactly the turns of its JSON."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from tests.conftest import wait_for_job
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

    bad = client.post("/jobs/diarize", files={"file": ("x.wav", b"RIFF not really audio", "audio/wav")}).json()
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
