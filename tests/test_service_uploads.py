"""Speech as users upload it (MP3, AAC in MP4, Opus in WebM and Ogg, FLAC), through the API,
Redis and the session's worker, which runs as deployments and `up` run it (prefork).

Each format reaches a different reader: libsndfile takes FLAC and Ogg Opus; only FFmpeg reads MP3,
M4A and WebM, whose headers are read in the sandboxed child (shared/probe_sandbox.py) at submit
and again in the worker's pool process. In that pool process the child could not be started
(multiprocessing refuses a daemonic process children), so every MP3, M4A and WebM failed as an
internal error in every deployed worker while these formats passed every engine-level test.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from evaluation.encoding import encode
from tests.conftest import wait_for_job

UPLOADS = [  # (file name, MIME type, container, codec, bit rate)
    ("call.mp3", "audio/mpeg", "mp3", "libmp3lame", 64_000),
    ("memo.m4a", "audio/mp4", "mp4", "aac", 64_000),
    ("browser.webm", "audio/webm", "webm", "libopus", 32_000),
    ("voice.opus", "audio/ogg", "ogg", "libopus", 24_000),
    ("archive.flac", "audio/flac", "flac", "flac", None),
]


def _speech_seconds(result: dict) -> float:
    return sum(turn["end"] - turn["start"] for turn in result["diarization_results"])


def test_speech_in_the_formats_users_upload_is_diarized_as_the_wav_is(client, short_sample, tmp_path):
    samples, rate = sf.read(short_sample, dtype="float32")
    wav = client.post("/jobs/diarize", files={"file": (short_sample.name, short_sample.read_bytes(), "audio/wav")})
    assert wav.status_code == 202, wav.text
    submitted = {}
    for name, mime, container, codec, bit_rate in UPLOADS:
        data = encode(samples, rate, container=container, codec=codec, bit_rate=bit_rate)
        r = client.post("/jobs/diarize", files={"file": (name, data, mime)})
        assert r.status_code == 202, (name, r.text)
        submitted[name] = r.json()["job_id"]
    reference = wait_for_job(client, wav.json()["job_id"], timeout_s=180)
    assert reference["status"] == "succeeded", reference
    speakers = {turn["speaker"] for turn in reference["result"]["diarization_results"]}
    assert len(speakers) == 2  # the sample's two talkers, both in its first 12 s
    for name, job_id in submitted.items():
        done = wait_for_job(client, job_id, timeout_s=180)
        assert done["status"] == "succeeded", (name, done.get("error"))
        result = done["result"]
        # the codec's delay and padding move the ends by a frame or two, not by seconds
        assert result["audio_duration"] == pytest.approx(reference["result"]["audio_duration"], abs=0.2), name
        assert {turn["speaker"] for turn in result["diarization_results"]} == speakers, (name, result)
        assert _speech_seconds(result) == pytest.approx(_speech_seconds(reference["result"]), rel=0.15), name
