"""The original synchronous contract through the queue, errors in the documented shape, limits, auth."""

from __future__ import annotations

import io
import json
import pickle
import time

import numpy as np
import pytest
from pydantic import SecretStr

from tests.conftest import newest_job_ids
from tests.test_service_jobs import COMPARE_KEYS, DIARIZE_KEYS, EMBED_KEYS

ERROR_KEYS = {"detail", "error_type", "timestamp"}


def _f(name, path):
    return {name: (path.name, path.read_bytes(), "audio/wav")}


def _assert_error(r, status: int, error_type: str = "ValidationError") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == ERROR_KEYS, body
    assert body["error_type"] == error_type
    assert body["timestamp"].endswith("Z") and body["detail"]
    return body


def test_health_reports_worker_models_and_broker(client):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert {"status", "diarization_model_loaded", "verification_model_loaded", "broker", "workers"} == set(body)
    assert body["status"] == "healthy" and body["broker"] == "ok"
    assert body["diarization_model_loaded"] is True and body["verification_model_loaded"] is True
    assert body["workers"][0]["model_device"] == "cpu"


def test_sync_diarize_shape(client, short_sample):
    r = client.post("/diarize", files=_f("file", short_sample), data={"min_speakers": "1", "max_speakers": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == DIARIZE_KEYS
    assert body["segments_count"] == len(body["diarization_results"]) > 0
    assert all(set(s) == {"start", "end", "speaker"} and s["end"] > s["start"] for s in body["diarization_results"])
    assert body["diarization_results"][0]["speaker"] == "SPEAKER_00"


def test_sync_embedding_and_compare_shapes(client, utterances, settings):
    r = client.post("/embedding", files=_f("file", utterances["spk1"][0]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == EMBED_KEYS
    assert body["normalized"] is True and len(body["embedding"]) == 192
    assert np.linalg.norm(body["embedding"]) == pytest.approx(1.0, abs=1e-4)

    r = client.post("/compare", files={**_f("file1", utterances["spk1"][0]), **_f("file2", utterances["spk1"][1])})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == COMPARE_KEYS
    assert body["same_speaker"] is (body["similarity_score"] >= body["threshold"]) is True
    # no threshold sent: the one calibrated for the worker's model (0.25 for production ECAPA)
    from engine.profiles import PROFILES

    assert body["threshold"] == PROFILES[settings.model_profile].default_threshold
    other = client.post("/compare", files={**_f("file1", utterances["spk1"][0]), **_f("file2", utterances["spk2"][0])})
    assert other.status_code == 200 and other.json()["same_speaker"] is False
    explicit = client.post("/compare", data={"threshold": "0.25"},
                           files={**_f("file1", utterances["spk1"][0]), **_f("file2", utterances["spk2"][0])})
    assert explicit.json()["threshold"] == 0.25


def test_sync_compare_embedding_json_and_npy(client, utterances):
    vector = client.post("/embedding", files=_f("file", utterances["spk2"][3])).json()["embedding"]
    npy = io.BytesIO()
    np.save(npy, np.asarray(vector, dtype=np.float32))
    scores = []
    for name, data in (("ref.json", json.dumps(vector).encode()), ("ref.npy", npy.getvalue())):
        r = client.post("/compare_embedding", files={**_f("audio", utterances["spk2"][4]), "embedding": (name, data)},
                        data={"threshold": "0.5"})
        assert r.status_code == 200, r.text
        assert set(r.json()) == COMPARE_KEYS
        assert r.json()["same_speaker"] is True
        scores.append(r.json()["similarity_score"])
    assert scores[0] == pytest.approx(scores[1], abs=1e-4)


def test_sync_compare_embedding_refuses_code_in_pickle(client, utterances, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    r = client.post("/compare_embedding", files={**_f("audio", utterances["spk2"][4]),
                                                 "embedding": ("ref.pkl", pickle.dumps(Evil()))})
    assert 400 <= r.status_code < 500
    assert set(r.json()) == ERROR_KEYS and r.json()["error_type"] == "ValidationError"
    assert not marker.exists()


@pytest.mark.parametrize(
    "path,data,fragment",
    [
        ("/diarize", {"num_speakers": "0"}, "num_speakers"),
        ("/diarize", {"min_speakers": "3", "max_speakers": "2"}, "max_speakers"),
        ("/diarize", {"min_duration": "-1"}, "min_duration"),
        ("/diarize", {"num_speakers": "two"}, "num_speakers"),
        ("/compare", {"threshold": "1.5"}, "threshold"),
        ("/embedding", {"normalize": "maybe"}, "normalize"),
        ("/jobs/diarize", {"max_speakers": "500"}, "max_speakers"),
    ],
)
def test_invalid_parameters_are_422_before_enqueueing(client, utterances, settings, path, data, fragment):
    files = _f("file", utterances["spk1"][0]) if path != "/compare" else {
        **_f("file1", utterances["spk1"][0]), **_f("file2", utterances["spk1"][1])}
    before = newest_job_ids(client)
    # nothing new stored: the uploads of jobs an earlier test left running (in whichever order
    # the suite's processes ran the files) are not this request's
    stored = set(settings.storage_dir.iterdir()) if settings.storage_dir.exists() else set()
    body = _assert_error(client.post(path, files=files, data=data), 422)
    assert fragment in body["detail"]
    assert newest_job_ids(client) == before
    assert (set(settings.storage_dir.iterdir()) if settings.storage_dir.exists() else set()) <= stored


def test_missing_file_and_bad_audio(client):
    body = _assert_error(client.post("/embedding", data={"normalize": "true"}), 422)
    assert "file" in body["detail"]
    body = _assert_error(client.post("/embedding", files={"file": ("x.wav", b"RIFF not really a wav", "audio/wav")}), 415)
    assert body["detail"]


def test_a_comparison_names_the_recording_it_refuses(client, utterances):
    """A silent (or too short) second recording was refused "audio is silent: no signal to
    analyse", leaving the caller to guess which of the two it was."""
    import soundfile as sf

    silence = io.BytesIO()
    sf.write(silence, np.zeros(16000 * 3, dtype=np.int16), 16000, format="WAV", subtype="PCM_16")
    body = _assert_error(client.post("/compare", files={
        "file1": _f("file1", utterances["spk1"][0])["file1"],
        "file2": ("quiet.wav", silence.getvalue(), "audio/wav")}), 422)
    assert body["detail"].startswith("file2: audio is silent"), body


def test_not_found_routes_use_the_error_shape(client):
    _assert_error(client.get("/no/such/route"), 404)
    _assert_error(client.get("/jobs/unknown-job"), 404)
    _assert_error(client.get("/batches/unknown"), 404)


def test_oversized_upload_is_413_and_nothing_is_stored(variant_app, utterances, settings):
    small = variant_app(max_upload_bytes=10_000)
    before = set(settings.storage_dir.iterdir()) if settings.storage_dir.exists() else set()
    body = _assert_error(small.post("/jobs/embedding", files=_f("file", utterances["spk1"][0])), 413)
    assert "10000" in body["detail"]
    _assert_error(small.post("/embedding", files=_f("file", utterances["spk1"][0])), 413)
    after = set(settings.storage_dir.iterdir()) if settings.storage_dir.exists() else set()
    # nothing new stored; an earlier test's job may end meanwhile and its upload go with it
    assert after <= before, after - before


def test_api_key_auth(variant_app, utterances):
    secured = variant_app(api_keys=[SecretStr("s3cret"), SecretStr("other")])
    _assert_error(secured.get("/jobs"), 401)
    _assert_error(secured.get("/jobs", headers={"X-API-Key": "wrong"}), 401)
    _assert_error(secured.post("/embedding", files=_f("file", utterances["spk1"][0])), 401)
    assert secured.get("/jobs", headers={"X-API-Key": "s3cret"}).status_code == 200
    r = secured.post("/embedding", files=_f("file", utterances["spk1"][0]), headers={"X-API-Key": "other"})
    assert r.status_code == 200 and len(r.json()["embedding"]) == 192
    assert secured.get("/health").status_code == 200  # stays open


def test_health_detail_needs_a_key_when_keys_are_on(variant_app):
    """A probe without a key learns the status, not the workers' hosts, pids, devices and load
    errors, nor the broker's address (which an unreachable Redis's error names)."""
    secured = variant_app(api_keys=[SecretStr("s3cret")])
    anonymous = secured.get("/health").json()
    assert set(anonymous) >= {"status", "diarization_model_loaded", "verification_model_loaded"}
    assert anonymous["status"] == "healthy" and anonymous["diarization_model_loaded"] is True
    assert anonymous["workers"] is None and anonymous["broker"] == "ok"
    for key in ("wrong", None):
        headers = {"X-API-Key": key} if key else {}
        assert secured.get("/health", headers=headers).json()["workers"] is None
    detailed = secured.get("/health", headers={"X-API-Key": "s3cret"}).json()
    assert detailed["workers"] and all("pid" in w for w in detailed["workers"])

    unreachable = variant_app(api_keys=[SecretStr("s3cret")], redis_url="redis://127.0.0.1:1/0")
    r = unreachable.get("/health")
    assert r.status_code == 503 and r.json()["broker"] == "unreachable"
    reason = unreachable.get("/health", headers={"X-API-Key": "s3cret"}).json()["broker"]
    assert reason.startswith("unreachable: ") and "127.0.0.1" in reason


def test_webhook_host_policy(variant_app, utterances):
    strict = variant_app(webhook_allowed_hosts=["hooks.internal"])
    body = _assert_error(strict.post("/jobs/embedding", files=_f("file", utterances["spk1"][0]),
                                     data={"webhook_url": "http://127.0.0.1:9999/hook"}), 422)
    assert "allowed" in body["detail"]
    _assert_error(strict.post("/jobs/embedding", files=_f("file", utterances["spk1"][0]),
                              data={"webhook_url": "file:///etc/passwd"}), 422)


def test_metrics_expose_jobs_durations_and_queue_depth(client, utterances):
    job = client.post("/jobs/embedding", files=_f("file", utterances["spk1"][1])).json()
    from tests.conftest import wait_for_job

    wait_for_job(client, job["job_id"])
    # read once: the job's counts are written in the transaction that ended it (JobStore.finish)
    text = client.get("/metrics").text
    assert 'audio_analysis_jobs{state="succeeded"}' in text
    assert 'audio_analysis_jobs_finished_total{kind="embedding",status="succeeded"}' in text
    assert 'audio_analysis_job_duration_seconds_count{kind="embedding"}' in text
    assert 'audio_analysis_queue_depth{queue="audio-test"} 0.0' in text
    assert "audio_analysis_workers 1.0" in text
    assert "audio_analysis_http_request_duration_seconds_bucket" in text


def test_metrics_show_each_worker_process_and_its_device(client, utterances):
    """Worker readings travel with the heartbeat (worker/telemetry.py) and every API replica
    exposes them, labelled by worker and device; a CPU worker has no GPU series."""
    import re
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from tests.conftest import wait_for_job

    job = client.post("/jobs/embedding", files=_f("file", utterances["spk2"][1])).json()
    wait_for_job(client, job["job_id"])
    deadline = time.monotonic() + 15
    while True:  # the heartbeat after the job (every second in the tests) carries its count
        samples = {(s.name, s.labels.get("worker")): s for f in text_string_to_metric_families(client.get("/metrics").text)
                   for s in f.samples if s.name.startswith("audio_analysis_worker_")}
        done = [s for (name, _), s in samples.items() if name == "audio_analysis_worker_jobs_done"]
        if done and max(s.value for s in done) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    names = {name for name, _ in samples}
    assert {"audio_analysis_worker_rss_bytes", "audio_analysis_worker_cpu_percent",
            "audio_analysis_worker_model_load_seconds", "audio_analysis_worker_jobs_running",
            "audio_analysis_worker_jobs_done"} <= names
    rss = [s for (name, _), s in samples.items() if name == "audio_analysis_worker_rss_bytes"]
    # the worker's role and a digest of its name (api.metrics.worker_label), never its host
    assert all(s.labels["device"] == "cpu" and re.fullmatch(r"test-worker-[0-9a-f]{8}", s.labels["worker"])
               for s in rss)
    assert max(s.value for s in rss) > 300 * 2**20  # a process with the models loaded
    assert max(s.value for s in done) >= 1
    assert not any(name.startswith("audio_analysis_worker_gpu_") for name in names)


def test_openapi_documents_sync_and_job_interface(client):
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {"/health", "/diarize", "/embedding", "/compare", "/compare_embedding", "/jobs", "/jobs/{job_id}",
            "/jobs/{job_id}/cancel", "/jobs/diarize", "/jobs/embedding", "/jobs/compare", "/jobs/compare_embedding",
            "/jobs/batch", "/batches/{batch_id}", "/metrics"} <= paths
    form = spec["paths"]["/diarize"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    props = spec["components"]["schemas"][form.rsplit("/", 1)[1]]["properties"]
    assert {"file", "num_speakers", "min_speakers", "max_speakers", "min_duration"} <= set(props)
    assert client.get("/docs").status_code == 200


def test_bad_embedding_file_is_refused_at_submit(client, utterances):
    before = newest_job_ids(client)
    for name, data in (("ref.json", b"[1, 2, 3]"), ("ref.json", b"{not json"), ("ref.bin", b"\x00" * 10)):
        r = client.post("/jobs/compare_embedding",
                        files={**_f("audio", utterances["spk1"][0]), "embedding": (name, data)})
        _assert_error(r, r.status_code)
        assert 400 <= r.status_code < 500, r.text
    assert newest_job_ids(client) == before
