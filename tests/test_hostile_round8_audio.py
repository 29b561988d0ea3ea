"""Hostile audio, round 8: recordings that decode, but on which a step of the analysis had
nothing to work with."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf


def _hum_wav(seconds: float = 3.0, hz: float = 110.0) -> bytes:
    """A low steady hum: the segmentation hears a "speaker" in it, whose every stretch is too
    short (or too overlapped) to be embedded."""
    buf = io.BytesIO()
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(buf, (np.sin(2 * np.pi * hz * t) * 0.3).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.mark.parametrize("form", [{}, {"exclusive": "true"}, {"num_speakers": "2"}, {"max_speakers": "1"}])
def test_a_recording_where_nobody_could_be_embedded_is_diarized_not_an_internal_error(client, form):
    """3 s of a 110 Hz hum (so a short clip of a video's audio track, or a WAV whose header halves
    its rate) has speech by the segmentation's count but no speaker long enough to embed: every
    speaker inherited the throw-away cluster from neighbours that had none, and the
    reconstruction failed on -1 clusters (500 "internal error", ValueError: negative dimensions).
    Now pyannote's one cluster stands."""
    r = client.post("/diarize", files={"file": ("hum.wav", _hum_wav(), "audio/wav")}, data=form)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["audio_duration"] == pytest.approx(3.0, abs=0.01)
    assert body["segments_count"] == len(body["diarization_results"])
    assert {t["speaker"] for t in body["diarization_results"]} <= {"SPEAKER_00"}
