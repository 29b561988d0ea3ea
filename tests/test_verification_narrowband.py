"""Verification of two telephone recordings is decided at the threshold calibrated for them.

CAM++ hears nothing above 4 kHz in a call, so two different voices at 8 kHz share that much of
their embeddings: 7.5 % of different-reader pairs of LibriSpeech halves at 8 kHz mu-law passed
the 0.45 threshold calibrated at 16 kHz (docs/models.md, "Through a telephone line"). The decoder
now says which rate a recording had (``Audio.source_rate``) and ``/compare`` of two narrowband
recordings uses the profile's ``narrowband_threshold`` (0.55) unless the caller gives one.

Real readers of ../shared/data (two LibriSpeech readers whose 8 kHz halves score about 0.50 and
whose 16 kHz halves about 0.15), through the real API and worker (the session's ``client``).
"""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from engine.audio import load_audio
from engine.profiles import EMBEDDED
from evaluation.speech import librispeech_utterance

READERS = Path("../shared/data/speech/librispeech-train-clean")
IMPOSTOR, TARGET = "1069-133699-0000.ogg", "7302-86814-0000.ogg"


def _halves(name: str) -> tuple[np.ndarray, np.ndarray]:
    samples = librispeech_utterance(READERS / name)
    half = len(samples) // 2
    return samples[:half], samples[half:]


def _wav16(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _mulaw8k(samples: np.ndarray) -> bytes:
    """What a call recorder writes (``ffmpeg -ar 8000 -acodec pcm_mulaw``): G.711 mu-law at 8 kHz."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(resample_poly(samples, 1, 2), -1, 1), 8000, format="WAV", subtype="ULAW")
    return buf.getvalue()


def _mp3(samples: np.ndarray, rate: int) -> bytes:
    """MP3 through FFmpeg (PyAV), which the decoder reads with PyAV or libsndfile alike."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(resample_poly(samples, rate, 16000).astype(np.float32)[None, :],
                                           format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


@pytest.fixture(scope="module")
def calls() -> dict[str, bytes]:
    impostor, _ = _halves(IMPOSTOR)
    first, second = _halves(TARGET)
    return {"impostor8": _mulaw8k(impostor), "first8": _mulaw8k(first), "second8": _mulaw8k(second),
            "impostor16": _wav16(impostor), "first16": _wav16(first)}


def _compare(client, one: bytes, two: bytes, **data: str) -> dict:
    r = client.post("/compare", data=data, files={"file1": ("a.wav", one, "audio/wav"),
                                                  "file2": ("b.wav", two, "audio/wav")})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_decoder_says_a_recording_is_narrowband_in_any_form():
    speech, _ = _halves(TARGET)
    for data, rate in ((_mulaw8k(speech), 8000), (_mp3(speech, 8000), 8000), (_wav16(speech), 16000),
                       (_mp3(speech, 44100), 44100)):
        audio = load_audio(data)
        assert (audio.source_rate, audio.narrowband) == (rate, rate <= 8000)


def test_two_calls_are_verified_at_the_telephone_threshold(client, calls):
    assert EMBEDDED.narrowband_threshold == 0.55
    # another reader, both over the line: between the two thresholds, so accepted at 16 kHz's
    impostor = _compare(client, calls["impostor8"], calls["second8"])
    assert 0.45 < impostor["similarity_score"] < 0.55, impostor
    assert (impostor["threshold"], impostor["same_speaker"]) == (0.55, False)
    # the same reader over the line still passes it
    genuine = _compare(client, calls["first8"], calls["second8"])
    assert (genuine["threshold"], genuine["same_speaker"]) == (0.55, True), genuine


def test_microphone_recordings_and_a_callers_own_threshold_are_unchanged(client, calls):
    wideband = _compare(client, calls["impostor16"], calls["first16"])
    assert (wideband["threshold"], wideband["same_speaker"]) == (0.45, False), wideband
    # enrolled on a microphone, verified on a call: the default (their scores are lower, not higher)
    mixed = _compare(client, calls["first16"], calls["second8"])
    assert (mixed["threshold"], mixed["same_speaker"]) == (0.45, True), mixed
    asked = _compare(client, calls["impostor8"], calls["second8"], threshold="0.45")
    assert (asked["threshold"], asked["same_speaker"]) == (0.45, True), asked
