"""Issue 10, known speakers by name: voiceprints enrolled, stored, exported and imported through
the real API and worker, and used by diarization and ``identify`` on real speech.

Real Redis, the session's Celery worker process (embedded CAM++), LibriSpeech readers from
../shared/data/speech: the first half of a reader's utterance enrolls, the second half speaks in
the conversation (as bench/identification.py does on 124 readers).
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr

from tests.conftest import wait_for_job, wav_without_samples
from tests.test_service_jobs import DIARIZE_KEYS

LIBRISPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech" / "librispeech-train-clean"
ERROR_KEYS = {"detail", "error_type", "timestamp"}
MODEL = "3d-speaker/campplus-cn-en-common"
INFO_KEYS = {"id", "label", "model", "dimension", "speech_seconds", "files", "narrowband", "created_at"}
# three readers to enroll, one who never is (calibration readers of bench/identification.py)
ENROLLED = ("103", "1040", "1069")
OUTSIDER = "1081"


@pytest.fixture(scope="module")
def readers(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """reader -> {"enroll": first half, "test": second half} as 16 kHz WAV files."""
    import soundfile as sf

    from engine.audio import load_audio
    from evaluation.speech import trim_silence

    folder = tmp_path_factory.mktemp("readers")
    out = {}
    for reader in ENROLLED + (OUTSIDER,):
        (path,) = LIBRISPEECH.glob(f"{reader}-*.ogg")
        samples = trim_silence(load_audio(path).float32())
        half = len(samples) // 2
        out[reader] = {}
        for part, piece in (("enroll", samples[:half]), ("test", samples[half:])):
            target = folder / f"{reader}_{part}.wav"
            sf.write(target, piece, 16000, subtype="PCM_16")
            out[reader][part] = target
    return out


@pytest.fixture(scope="module")
def conversation(readers, tmp_path_factory) -> tuple[Path, object]:
    """The four readers' second halves in turns of 2-4 s, with pauses and overlaps."""
    import soundfile as sf

    from engine.audio import load_audio
    from evaluation.speech import Clip, many_talker_conversation

    clips = [Clip(r, load_audio(readers[r]["test"]).float32()) for r in ENROLLED + (OUTSIDER,)]
    samples, reference = many_talker_conversation(len(clips), clips=clips, seed=1)
    path = tmp_path_factory.mktemp("conversation") / "conversation.wav"
    sf.write(path, samples, 16000, subtype="PCM_16")
    return path, reference


def _wav(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "audio/wav")


def _error(r, status: int, fragment: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == ERROR_KEYS, body
    assert fragment.lower() in body["detail"].lower(), body["detail"]
    return body


def _enroll(http, label: str, *paths: Path, headers: dict | None = None) -> dict:
    r = http.post("/voiceprints", files=[("files", _wav(p)) for p in paths], data={"label": label}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def _clear(client) -> None:
    for vp in client.get("/voiceprints").json()["voiceprints"]:
        client.delete(f"/voiceprints/{vp['id']}")


# --- 1. the voiceprint routes --------------------------------------------------------------------


def test_enroll_list_get_export_import_delete(client, utterances, settings):
    _clear(client)
    created = _enroll(client, "Alice", utterances["spk1"][0], utterances["spk1"][1])
    assert set(created) == INFO_KEYS
    assert created["id"].startswith("vp_") and created["label"] == "Alice"
    assert created["model"] == MODEL and created["dimension"] == 192 and created["files"] == 2
    assert created["speech_seconds"] >= settings.voiceprint_min_speech_s
    vp_id = created["id"]

    assert client.get(f"/voiceprints/{vp_id}").json() == created
    listed = client.get("/voiceprints").json()
    assert listed["count"] == 1 and listed["voiceprints"] == [created]

    exported = client.get(f"/voiceprints/{vp_id}/export").json()
    assert exported["format"] == "audio-analysis/voiceprint-v1"
    vector = np.asarray(exported["embedding"])
    assert vector.shape == (192,) and abs(np.linalg.norm(vector) - 1) < 1e-4
    assert {k: exported[k] for k in INFO_KEYS} == created
    r = client.get(f"/voiceprints/{vp_id}/export", params={"format": "npy"})
    assert r.status_code == 200 and r.headers["x-voiceprint-model"] == MODEL
    npy = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert npy.dtype == np.float32 and np.allclose(npy, vector, atol=1e-6)

    # the same person again from the other clips: the voiceprints agree
    again = client.get(f"/voiceprints/{_enroll(client, 'Alice 2', *utterances['spk1'][2:4])['id']}/export").json()
    assert float(np.dot(vector, again["embedding"])) > 0.6

    # import: our JSON export as it is, and a bare .npy with its label and model
    r = client.post("/voiceprints/import", files={"file": ("alice.json", json.dumps(exported).encode(), "application/json")})
    assert r.status_code == 201, r.text
    imported = r.json()
    assert imported["id"] != vp_id and imported["label"] == "Alice" and imported["speech_seconds"] == created["speech_seconds"]
    assert np.allclose(client.get(f"/voiceprints/{imported['id']}/export").json()["embedding"], vector, atol=1e-6)
    r = client.post("/voiceprints/import", files={"file": ("a.npy", _npy(npy), "application/octet-stream")},
                    data={"label": "Alice (npy)", "model": MODEL})
    assert r.status_code == 201, r.text
    assert r.json()["files"] is None and r.json()["label"] == "Alice (npy)"
    # refused: a bare vector without its model or label, a pickle, another dimension
    _error(client.post("/voiceprints/import", files={"file": ("a.npy", _npy(npy), "application/octet-stream")},
                       data={"label": "x"}), 422, "model")
    _error(client.post("/voiceprints/import", files={"file": ("a.npy", _npy(npy), "application/octet-stream")},
                       data={"model": MODEL}), 422, "label")
    _error(client.post("/voiceprints/import", files={"file": ("a.pkl", pickle.dumps(vector.tolist()), "application/octet-stream")},
                       data={"label": "x", "model": MODEL}), 422, "pickle")
    _error(client.post("/voiceprints/import", files={"file": ("a.json", json.dumps(vector[:100].tolist()).encode(), "application/json")},
                       data={"label": "x", "model": MODEL}), 422, "192")

    assert client.get("/voiceprints").json()["count"] == 4
    assert client.delete(f"/voiceprints/{vp_id}").status_code == 204
    _error(client.get(f"/voiceprints/{vp_id}"), 404, vp_id)
    _error(client.delete(f"/voiceprints/{vp_id}"), 404)
    _error(client.get(f"/voiceprints/{vp_id}/export"), 404)
    assert vp_id not in {v["id"] for v in client.get("/voiceprints").json()["voiceprints"]}
    # voiceprints never expire, unlike job records
    import redis

    key = f"{settings.redis_key_prefix}:voiceprint:{imported['id']}"
    assert redis.Redis.from_url(settings.redis_url).ttl(key) == -1
    _clear(client)


def _npy(vector: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, vector)
    return buf.getvalue()


def test_too_little_speech_is_refused_with_how_much_is_needed(client, readers, tmp_path, settings):
    import soundfile as sf

    audio, rate = sf.read(readers["103"]["enroll"], dtype="float32")
    short = tmp_path / "short.wav"
    sf.write(short, audio[: int(1.5 * rate)], rate, subtype="PCM_16")
    silence = tmp_path / "silence.wav"
    sf.write(silence, np.random.default_rng(0).normal(0, 1e-3, 5 * rate).astype(np.float32), rate, subtype="PCM_16")
    before = client.get("/voiceprints").json()["count"]
    for files in ([short], [short, silence]):
        r = client.post("/voiceprints", files=[("files", _wav(p)) for p in files], data={"label": "Bob"})
        body = _error(r, 422, "too little speech")
        assert f"at least {settings.voiceprint_min_speech_s:.1f} s" in body["detail"]
    _error(client.post("/voiceprints", files=[("files", _wav(short))]), 422, "label")
    assert client.get("/voiceprints").json()["count"] == before
    # and as a job: the enroll kind's error body
    r = client.post("/jobs/enroll", files=[("files", _wav(short))], data={"label": "Bob"})
    assert r.status_code == 202, r.text
    done = wait_for_job(client, r.json()["job_id"])
    assert done["status"] == "failed" and done["error"]["status_code"] == 422
    assert "too little speech" in done["error"]["detail"]


@pytest.mark.parametrize("detected,needed,shown", [
    (2.96, 3.0, ("2.9", "3.0")), (2.999, 3.0, ("2.9", "3.0")), (0.0, 3.0, ("0.0", "3.0")),
    (1.54, 1.55, ("1.5", "1.6")), (2.9, 3.0, ("2.9", "3.0")),
])
def test_too_little_speech_never_reads_as_enough(detected, needed, shown):
    """2.96 s of a 3.0 s minimum said "3.0 s detected ... at least 3.0 s needed"."""
    from engine.core import shortfall

    assert shortfall(detected, needed) == shown


def test_voiceprints_of_another_model_are_refused(client, variant_app, readers, settings):
    from shared.voiceprints import EmbeddingModel, VoiceprintStore

    vector = np.random.default_rng(1).normal(size=192).astype(np.float32)
    ecapa = "speechbrain/spkrec-ecapa-voxceleb"
    # at import: this service's model is CAM++
    doc = {"label": "Carol", "model": ecapa, "dimension": 192, "embedding": vector.tolist()}
    _error(client.post("/voiceprints/import", files={"file": ("c.json", json.dumps(doc).encode(), "application/json")}),
           422, ecapa)
    _error(client.post("/voiceprints/import", files={"file": ("c.npy", _npy(vector), "application/octet-stream")},
                       data={"label": "Carol", "model": ecapa}), 422, ecapa)
    # stored by an older deployment with another model: a job naming it is refused at submit
    store = VoiceprintStore.from_settings(settings)
    old = store.create(owner=None, label="Carol", model=EmbeddingModel(ecapa, 192), embedding=vector)
    for route in ("/jobs/diarize", "/jobs/identify", "/identify"):
        _error(client.post(route, files={"file": _wav(readers["103"]["test"])}, data={"voiceprints": old.id}),
               422, ecapa)
    store.delete(old.id, None)
    # an API configured for the production model accepts ECAPA vectors; the (embedded) worker then
    # refuses them itself: the worker checks the model of every voiceprint it is given
    production = variant_app(model_profile="production")
    r = production.post("/voiceprints/import", files={"file": ("c.json", json.dumps(doc).encode(), "application/json")})
    assert r.status_code == 201, r.text
    job = production.post("/jobs/identify", files={"file": _wav(readers["103"]["test"])},
                          data={"voiceprints": r.json()["id"]}).json()
    done = wait_for_job(client, job["job_id"])
    assert done["status"] == "failed", done
    assert done["error"]["status_code"] == 422 and "this worker embeds with" in done["error"]["detail"]
    assert MODEL in done["error"]["detail"]
    production.delete(f"/voiceprints/{r.json()['id']}")


def test_voiceprints_belong_to_their_api_key(variant_app, readers):
    secured = variant_app(api_keys=[SecretStr("key-a"), SecretStr("key-b")], admin_api_keys=[SecretStr("key-admin")])
    a, b, admin = ({"X-API-Key": k} for k in ("key-a", "key-b", "key-admin"))
    _error(secured.get("/voiceprints"), 401)
    mine = _enroll(secured, "Dana", readers["1069"]["enroll"], headers=a)
    vp_id = mine["id"]
    assert [v["id"] for v in secured.get("/voiceprints", headers=a).json()["voiceprints"]] == [vp_id]
    # key B: A's voiceprint does not exist, whatever it asks
    assert secured.get("/voiceprints", headers=b).json() == {"voiceprints": [], "count": 0}
    for r in (secured.get(f"/voiceprints/{vp_id}", headers=b), secured.get(f"/voiceprints/{vp_id}/export", headers=b),
              secured.delete(f"/voiceprints/{vp_id}", headers=b)):
        _error(r, 404, vp_id)
    clip = {"file": _wav(readers["1069"]["test"])}
    _error(secured.post("/jobs/identify", files=clip, data={"voiceprints": vp_id}, headers=b), 404, vp_id)
    _error(secured.post("/diarize", files=clip, data={"voiceprints": vp_id}, headers=b), 404, vp_id)
    _error(secured.post("/identify", files=clip, data={"voiceprints": "all"}, headers=b), 422, "no voiceprints")
    # A's own "all" is A's voiceprint; the record never shows the owner
    r = secured.post("/identify", files=clip, data={"voiceprints": "all"}, headers=a)
    assert r.status_code == 200, r.text
    assert r.json()["identity"] == "Dana" and r.json()["voiceprints"] == 1
    assert "owner" not in secured.get(f"/voiceprints/{vp_id}/export", headers=a).json()
    # the admin key reads and deletes by id; its own listing is its own
    assert secured.get(f"/voiceprints/{vp_id}", headers=admin).status_code == 200
    assert secured.get("/voiceprints", headers=admin).json()["count"] == 0
    assert secured.get(f"/voiceprints/{vp_id}", headers=a).status_code == 200
    assert secured.delete(f"/voiceprints/{vp_id}", headers=a).status_code == 204
    _error(secured.get(f"/voiceprints/{vp_id}", headers=admin), 404)


# --- 2. naming speakers ------------------------------------------------------------------------------


def _majority_speaker(reference, label: str, turns: list[dict]) -> str:
    """The reported speaker that covers most of the reference talker's speech."""
    from pyannote.core import Segment

    cover: dict[str, float] = {}
    for seg in reference.label_timeline(label):
        for t in turns:
            cover[t["speaker"]] = cover.get(t["speaker"], 0.0) + (seg & Segment(t["start"], t["end"])).duration
    return max(cover, key=cover.get)


def test_diarization_names_the_enrolled_talkers(client, readers, conversation):
    from engine.profiles import EMBEDDED

    _clear(client)
    ids = {r: _enroll(client, f"reader {r}", readers[r]["enroll"])["id"] for r in ENROLLED}
    path, reference = conversation

    plain = client.post("/diarize", files={"file": _wav(path)})
    assert plain.status_code == 200 and set(plain.json()) == DIARIZE_KEYS  # the original contract, untouched
    assert all(set(s) == {"start", "end", "speaker"} for s in plain.json()["diarization_results"])

    r = client.post("/diarize", files={"file": _wav(path)}, data={"voiceprints": "all"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == DIARIZE_KEYS | {"speakers", "identification"}
    info = body["identification"]
    assert info["voiceprints"] == 3 and info["model"] == MODEL and info["processing_time"] > 0
    assert info["threshold"] == EMBEDDED.identification_threshold == 0.5
    speakers = {s["speaker"]: s for s in body["speakers"]}
    assert set(speakers) == {t["speaker"] for t in body["diarization_results"]}
    for seg in body["diarization_results"]:
        assert seg["identity"] == speakers[seg["speaker"]]["identity"]
    turns = body["diarization_results"]
    for reader in ENROLLED:
        got = speakers[_majority_speaker(reference, reader, turns)]
        assert got["identity"] == f"reader {reader}", (reader, body["speakers"])
        assert got["voiceprint_id"] == ids[reader]
        assert got["confidence"] >= info["threshold"]
        assert got["runner_up"]["label"] != got["identity"] and got["runner_up"]["score"] < got["confidence"]
    assert speakers[_majority_speaker(reference, OUTSIDER, turns)]["identity"] is None, body["speakers"]
    # each voiceprint names at most one speaker
    named = [s["identity"] for s in body["speakers"] if s["identity"]]
    assert len(named) == len(set(named))

    # explicit ids as an asynchronous job, and a threshold nobody reaches
    job = client.post("/jobs/diarize", files={"file": _wav(path)},
                      data={"voiceprints": ",".join(ids.values()), "identification_threshold": "0.99"}).json()
    done = wait_for_job(client, job["job_id"])
    assert done["status"] == "succeeded", done
    assert all(s["identity"] is None for s in done["result"]["speakers"])
    assert all(s["confidence"] is None or s["confidence"] < 0.99 for s in done["result"]["speakers"])
    _error(client.post("/diarize", files={"file": _wav(path)}, data={"voiceprints": "vp_" + "0" * 32}), 404)
    _error(client.post("/diarize", files={"file": _wav(path)}, data={"voiceprints": "all", "identification_threshold": "2"}),
           422, "identification_threshold")


def test_subtitles_and_rttm_carry_the_names(client, readers, conversation):
    """GET /jobs/{id}/result?format=: a cue's speaker is its identity, else its diarization label,
    here with exclusive=true (one speaker at a time, as a transcript aligner wants)."""
    from tests.test_formats import read_rttm, read_srt, read_vtt

    _clear(client)
    for reader in ENROLLED:
        _enroll(client, f"reader {reader}", readers[reader]["enroll"])
    path, _ = conversation
    job = client.post("/jobs/diarize", files={"file": _wav(path)}, data={"voiceprints": "all", "exclusive": "true"})
    done = wait_for_job(client, job.json()["job_id"])
    assert done["status"] == "succeeded", done
    expected = [(s["start"], s["end"], s["identity"] or s["speaker"]) for s in done["result"]["diarization_results"]]
    names = {who for *_, who in expected}
    # the enrolled readers by name, the outsider by its label
    assert {f"reader {r}" for r in ENROLLED} <= names and any(n.startswith("SPEAKER_") for n in names), names
    assert all(a[1] <= b[0] for a, b in zip(expected, expected[1:])), "exclusive turns overlap"

    def fetch(fmt: str) -> str:
        r = client.get(f"/jobs/{done['job_id']}/result", params={"format": fmt})
        assert r.status_code == 200, r.text
        return r.text

    vtt = fetch("vtt")
    assert "<v reader 103>reader 103</v>" in vtt
    assert read_vtt(vtt) == expected and read_srt(fetch("srt")) == expected
    assert read_rttm(fetch("rttm")) == sorted((s, e, who.replace(" ", "_")) for s, e, who in expected)


def test_identify_picks_the_enrolled_reader(client, readers):
    _clear(client)
    ids = {r: _enroll(client, f"reader {r}", readers[r]["enroll"])["id"] for r in ENROLLED}
    r = client.post("/identify", files={"file": _wav(readers["1040"]["test"])}, data={"voiceprints": "all"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["identity"] == "reader 1040" and body["voiceprint_id"] == ids["1040"]
    assert body["confidence"] >= body["threshold"] and body["voiceprints"] == 3
    assert body["runner_up"]["label"] != "reader 1040" and body["runner_up"]["score"] < body["confidence"]
    assert body["model"] == MODEL and body["speech_seconds"] > 1
    # someone without a voiceprint: nobody, with the closest score still told
    job = client.post("/jobs/identify", files={"file": _wav(readers[OUTSIDER]["test"])},
                      data={"voiceprints": ",".join(ids.values())}).json()
    done = wait_for_job(client, job["job_id"])
    assert done["status"] == "succeeded", done
    assert done["result"]["identity"] is None and done["result"]["confidence"] < done["result"]["threshold"]
    # one voiceprint: no runner-up
    one = client.post("/identify", files={"file": _wav(readers["1069"]["test"])}, data={"voiceprints": ids["1069"]})
    assert one.json()["identity"] == "reader 1069" and one.json()["runner_up"] is None
    _error(client.post("/identify", files={"file": _wav(readers["1069"]["test"])}), 422, "voiceprints")
    _clear(client)


def test_assignment_is_optimal_not_greedy():
    from engine.pipelines.identification import assign

    # greedy (best pair first) gives vp0 to speaker 0 (0.80) and leaves speaker 1 unnamed; the
    # optimal assignment names both (0.75 + 0.70 over a threshold of 0.5)
    scores = np.array([[0.80, 0.75], [0.78, 0.20]])
    assert assign(scores, 0.5) == [1, 0]
    # one strong match is not traded for two weak ones
    assert assign(np.array([[0.90, 0.52], [0.55, 0.0]]), 0.5) == [0, None]
    # nobody over the threshold, more speakers than voiceprints, and none at all
    assert assign(np.array([[0.3], [0.2]]), 0.5) == [None, None]
    assert assign(np.array([[0.9], [0.8], [0.7]]), 0.5) == [0, None, None]
    assert assign(np.zeros((2, 0)), 0.5) == [None, None]


def test_client_sends_several_files_to_one_field():
    from cli.client import _assign

    assert _assign("enroll", ("a.wav", "b.wav", "c.wav")) == [("files", "a.wav"), ("files", "b.wav"), ("files", "c.wav")]
    assert _assign("compare", ("a.wav", "b.wav")) == [("file1", "a.wav"), ("file2", "b.wav")]
    with pytest.raises(ValueError):
        _assign("enroll", ())
    with pytest.raises(ValueError):
        _assign("diarize", ("a.wav", "b.wav"))


# --- 3. voiceprints in job records ---------------------------------------------------------------
# A job naming voiceprints used to carry every resolved vector in its record (4.3 KB each as JSON,
# 0.86 MB at the per-job limit of 200), kept 24 h and re-parsed on every poll and listing: a batch
# of 1000 one-byte files with kind=identify and voiceprints=all (a 200 KB request) wrote 860 MB
# into Redis, and resolved the 200 voiceprints once per file. They are now stored once, by
# content, and a record carries their digest (shared/jobs.py JobStore.keep_apart).


def _import_random(http, count: int, seed: int, headers: dict | None = None) -> list[str]:
    """``count`` voiceprints of nobody (random unit vectors: cosine about 0 with any voice),
    imported as a client would, without a worker."""
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(count):
        vector = rng.normal(size=192)
        r = http.post("/voiceprints/import", data={"label": f"stranger {seed}.{i}", "model": MODEL}, headers=headers,
                      files={"file": ("v.json", json.dumps((vector / np.linalg.norm(vector)).tolist()).encode(),
                                      "application/json")})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


def _redis(settings):
    import redis

    return redis.Redis.from_url(settings.redis_url)


def _bytes(r, keys) -> int:
    return sum(r.strlen(k) for k in keys)


def _memory(r, keys) -> int:
    return sum(r.memory_usage(k) or 0 for k in keys)


def test_a_batch_stores_its_voiceprints_once(client, readers, settings, monkeypatch):
    from shared.voiceprints import VoiceprintStore

    _clear(client)
    r = _redis(settings)
    prefix = settings.redis_key_prefix
    values_before = set(r.scan_iter(f"{prefix}:value:*", count=1000))
    enrolled = _enroll(client, "reader 1040", readers["1040"]["enroll"])["id"]
    strangers = _import_random(client, settings.voiceprints_max_per_job - 1, seed=3)
    one_copy = sum(len(json.dumps(client.get(f"/voiceprints/{i}/export").json()["embedding"])) for i in strangers)

    resolved = []
    resolve = VoiceprintStore.resolve
    monkeypatch.setattr(VoiceprintStore, "resolve",
                        lambda self, *a, **kw: resolved.append(a) or resolve(self, *a, **kw))
    # WAV headers without samples pass the API (audio of 0 s to its header check); the worker refuses them
    tiny = [("files", (f"tiny{i}.wav", wav_without_samples(), "audio/wav")) for i in range(40)]
    batch = client.post("/jobs/batch", data={"kind": "identify", "voiceprints": "all"},
                        files=[*tiny, ("files", _wav(readers["1040"]["test"]))])
    assert batch.status_code == 202, batch.text
    jobs = [j["job_id"] for j in batch.json()["jobs"]]
    records = [f"{prefix}:job:{j}" for j in jobs]
    values = set(r.scan_iter(f"{prefix}:value:*", count=1000)) - values_before
    record_bytes, value_bytes = _bytes(r, records), _bytes(r, values)
    figures = (f"{len(jobs)} records: {record_bytes} bytes ({_memory(r, records)} in Redis's memory); voiceprints "
               f"kept apart: {value_bytes} bytes in {len(values)} keys ({_memory(r, values)})")
    # before: every record held the 200 vectors (824 KB each, 33.8 MB for these 41 jobs)
    assert max(r.strlen(k) for k in records) < 2000, figures
    assert record_bytes < one_copy / 10, figures
    assert len(resolved) == 1, "the batch's voiceprints were resolved once per file"
    # stored once: the 200 voiceprints and the list of their digests
    assert len(values) == settings.voiceprints_max_per_job + 1 and value_bytes < 1.3 * one_copy, figures
    # they outlive every record naming them, so a job waiting in the queue or redelivered after its
    # worker died finds them for as long as it exists
    assert min(r.ttl(k) for k in values) >= max(r.ttl(k) for k in records) > 0

    # through the real worker: the one real recording is named, the empty WAVs refused there
    done = wait_for_job(client, jobs[-1], timeout_s=240)
    assert done["status"] == "succeeded", done
    assert done["result"]["identity"] == "reader 1040" and done["result"]["voiceprint_id"] == enrolled
    assert done["result"]["voiceprints"] == settings.voiceprints_max_per_job
    tiny_done = wait_for_job(client, jobs[0])
    assert tiny_done["status"] == "failed" and tiny_done["error"]["status_code"] == 415, tiny_done

    # a second batch of the same voiceprints stores nothing new; a subset of them, only its list
    again = client.post("/jobs/batch", data={"kind": "identify", "voiceprints": "all"}, files=tiny[:5])
    assert again.status_code == 202, again.text
    assert set(r.scan_iter(f"{prefix}:value:*", count=1000)) - values_before == values
    subset = client.post("/jobs/identify", data={"voiceprints": ",".join(strangers[:150])}, files={"file": tiny[0][1]})
    assert subset.status_code == 202, subset.text
    new = set(r.scan_iter(f"{prefix}:value:*", count=1000)) - values_before - values
    assert len(new) == 1 and _bytes(r, new) < 150 * 70, _bytes(r, new)
    for job in [*again.json()["jobs"], subset.json()]:
        assert wait_for_job(client, job["job_id"])["status"] == "failed"
    _clear(client)


def test_all_is_counted_before_any_voiceprint_is_read(variant_app, readers, monkeypatch):
    from shared.voiceprints import VoiceprintStore

    capped = variant_app(api_keys=[SecretStr("count-a")], voiceprints_max_per_job=2)
    a = {"X-API-Key": "count-a"}
    ids = _import_random(capped, 3, seed=4, headers=a)

    def read_all(*_, **__):
        raise AssertionError("all of the key's voiceprints were read before the per-job limit was checked")

    monkeypatch.setattr(VoiceprintStore, "list", read_all)
    _error(capped.post("/jobs/identify", files={"file": _wav(readers["1040"]["test"])}, data={"voiceprints": "all"},
                       headers=a), 422, "at most 2 per job; this key has 3")
    monkeypatch.undo()
    for vp_id in ids:
        assert capped.delete(f"/voiceprints/{vp_id}", headers=a).status_code == 204


def test_a_job_runs_from_an_old_record_and_fails_clearly_once_its_voiceprints_are_gone(
        client, variant_app, readers, settings):
    """Parked on a queue no worker reads, then sent to the worker: a record written before the
    voiceprints were kept apart (vectors inline) still runs; one whose voiceprints were lost
    (a flushed or evicting Redis) fails saying so, instead of running without them."""
    from shared.jobs import JobStore
    from shared.kinds import IDENTIFY
    from shared.queue import make_celery, send_job

    _clear(client)
    ids = {r: _enroll(client, f"reader {r}", readers[r]["enroll"])["id"] for r in ("1040", "1069")}
    parked = variant_app(queue_name="audio-parked")
    clip = {"file": _wav(readers["1040"]["test"])}
    old, lost = (parked.post("/jobs/identify", files=clip, data={"voiceprints": "all"}).json()["job_id"]
                 for _ in range(2))
    store = JobStore.from_settings(settings)
    r = _redis(settings)
    try:
        record = store.get(old)
        (digest,) = record.kept_apart.values()
        assert "voiceprints" not in record.params and record.kept_apart == store.get(lost).kept_apart
        # the record as the previous version wrote it: the vectors inline, no digest
        inline = json.loads(record.to_json())
        inline["_params"]["voiceprints"] = store.kept(digest)
        del inline["_kept_apart"]
        r.set(store.key("job", old), json.dumps(inline), keepttl=True)
        celery = make_celery(settings)
        send_job(celery, IDENTIFY, old, settings.queue_name)
        done = wait_for_job(client, old)
        assert done["status"] == "succeeded", done
        assert done["result"]["identity"] == "reader 1040" and done["result"]["voiceprint_id"] == ids["1040"]

        r.delete(store.key("value", digest))
        send_job(celery, IDENTIFY, lost, settings.queue_name)
        failed = wait_for_job(client, lost)
        assert failed["status"] == "failed" and "voiceprints: " in failed["error"]["detail"], failed
        assert "no longer stored" in failed["error"]["detail"]
    finally:
        r.delete("audio-parked")
    _clear(client)
