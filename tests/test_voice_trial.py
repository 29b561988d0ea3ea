"""A voice-authentication client's trial of the service: short phone-like clips, verification at
volume, through the real API and worker (tests/conftest.py's fixtures: real Redis, the session's
Celery worker with the embedded CAM++).

- ``test_sync_call_answers_as_its_job_ends``: a synchronous call (``/compare``, ``/embedding``,
  ``/compare_embedding``, ``POST /voiceprints``, ``/identify``) polls its job's record. The poll
  interval grew by half from 50 ms from the first poll, so a job that ended 0.45 s in was seen
  0.21 s late, at 0.7 s 0.35 s late, at 1.8 s 0.72 s late (this test, before): on 498 /compare
  calls of 1-7 s clips the answer came 0.19 s (median) after the worker's own 0.50 s. It now
  polls at 50 ms for a short job's first 2 s, then backs off as before (the test checks the
  waits the polling asks for, and the lag against a loose bound).
- ``test_too_little_speech_is_refused_not_scored``: ``/compare`` and ``/compare_embedding``
  refused a clip with no speech but scored one with a little: under 0.5 s of detected speech the
  whole recording was embedded, its silence with it, so 3.25 s holding 0.25 s of a reader's voice
  scored 0.105 against that reader's other half (200, ``same_speaker`` false: a genuine caller
  rejected with confidence), while ``/identify`` of the same clip said "too little speech". Over
  250 same-reader trials of 1-3 s clips, 0.5-0.75 s of speech was rejected 64 % of the time and
  0.75-1 s 11 %; more than 1 s never, and no other reader was accepted at any length. Both now
  answer 422 under 0.5 s of speech (what can be embedded alone), naming the field and the seconds
  found; 0.7 s of speech (a short answer) is scored, 1.2 s verified.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

LIBRISPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech" / "librispeech-train-clean"


def test_sync_call_answers_as_its_job_ends(settings, monkeypatch):
    from api.dispatch import Dispatcher
    from shared.jobs import RUNNING, SUCCEEDED, JobRecord, JobStore, new_job_id
    from shared.queue import make_celery
    from shared.storage import get_storage

    store = JobStore.from_settings(settings)
    lags = {}
    # each wait the polling asked for, with when it asked: the schedule itself, which a loaded
    # machine does not change, where the lag measured below has only a loose bound
    asked: list[tuple[float, float]] = []
    sleep = asyncio.sleep

    async def recorded(delay: float, *args, **kwargs):
        asked.append((time.monotonic() - started["at"], delay))
        return await sleep(delay, *args, **kwargs)

    monkeypatch.setattr(asyncio, "sleep", recorded)
    started = {"at": time.monotonic()}

    async def run(ends_after: float) -> float:
        dispatcher = Dispatcher(settings, store, get_storage(settings), make_celery(settings))
        record = store.create(JobRecord(job_id=new_job_id(), kind="compare"))
        store.update(record.job_id, lambda r: r.model_copy(update={"status": RUNNING}))
        ended = {}

        def finish() -> None:
            time.sleep(ends_after)
            store.finish(record.job_id, SUCCEEDED, result={"similarity_score": 0.9})
            ended["at"] = time.monotonic()

        worker = threading.Thread(target=finish)
        started["at"] = time.monotonic()
        worker.start()
        try:
            answer = await dispatcher.wait(record.job_id, 30)
            answered = time.monotonic()
        finally:
            worker.join()
            await dispatcher.close()
        assert answer.status == SUCCEEDED
        return answered - ended["at"]

    for ends_after in (0.3, 0.45, 0.7, 1.2, 1.8):
        lags[ends_after] = asyncio.run(run(ends_after))
    # for a call's first 2 s the polls are sync_poll_interval_s apart (before: 50, 75, 112, 168,
    # 253, 380 ms...); a wait asked for within the last poll interval before 2 s may be the first
    # longer one
    early = [delay for at, delay in asked if at < 2.0 - 2 * settings.sync_poll_interval_s]
    assert early and max(early) <= settings.sync_poll_interval_s + 1e-9, sorted(early)[-5:]
    # and so the answer comes about one interval after the job ended (before: 0.21, 0.35 and
    # 0.72 s late at 0.45, 0.7 and 1.8 s); the bound leaves a loaded 2-core machine its delays
    assert max(lags.values()) < 0.5, lags


@pytest.fixture(scope="module")
def reader_103(tmp_path_factory) -> dict[str, bytes]:
    """Reader 103's utterance halved (WAV bytes), and clips of the second half: 0.25 s of speech
    between 1 s and 2 s of silence, 0.7 s alone, and 1.2 s within 0.4 s of silence either side."""
    import io

    import soundfile as sf

    from engine.audio import load_audio

    (path,) = LIBRISPEECH.glob("103-*.ogg")
    samples = load_audio(path).float32()
    half = len(samples) // 2
    second = samples[half:]
    rate = 16000
    silence = np.zeros(rate, dtype=np.float32)

    def wav(x: np.ndarray) -> bytes:
        out = io.BytesIO()
        sf.write(out, x, rate, format="WAV", subtype="PCM_16")
        return out.getvalue()

    return {
        "enroll": wav(samples[:half]),
        "speech_0.25": wav(np.concatenate([silence, second[8000:12000], silence, silence])),
        "speech_0.7": wav(second[8000:8000 + int(0.7 * rate)]),
        "speech_1.2": wav(np.concatenate([silence[:6400], second[8000:8000 + int(1.2 * rate)], silence[:6400]])),
    }


def test_too_little_speech_is_refused_not_scored(client, reader_103) -> None:
    def clip(name: str) -> tuple[str, bytes, str]:
        return (f"{name}.wav", reader_103[name], "audio/wav")

    enrolled = client.post("/embedding", files={"file": clip("enroll")})
    assert enrolled.status_code == 200, enrolled.text
    stored = json_vector(enrolled.json()["embedding"])
    r = client.post("/compare", files={"file1": clip("enroll"), "file2": clip("speech_0.25")})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("file2: too little speech to verify"), r.json()
    assert "at least 0.5 s needed" in r.json()["detail"], r.json()
    r = client.post("/compare_embedding", files={"audio": clip("speech_0.25"),
                                                 "embedding": ("me.json", stored, "application/json")})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("audio: too little speech to verify"), r.json()
    # a short answer (0.7 s of speech: "yes", a name) is scored, as verification clients send them
    r = client.post("/compare", files={"file1": clip("enroll"), "file2": clip("speech_0.7")})
    assert r.status_code == 200 and 0 < r.json()["similarity_score"] <= 1, r.text
    # enough speech is verified as before, the same reader accepted
    r = client.post("/compare", files={"file1": clip("enroll"), "file2": clip("speech_1.2")})
    assert r.status_code == 200 and r.json()["same_speaker"], r.text
    r = client.post("/compare_embedding", files={"audio": clip("speech_1.2"), "embedding": ("me.json", stored, "application/json")})
    assert r.status_code == 200 and r.json()["same_speaker"], r.text


def json_vector(vector: list[float]) -> bytes:
    import json

    return json.dumps(vector).encode()
