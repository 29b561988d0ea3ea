"""The recording conditions the clustering is checked under do what their names say.

Tuning figures taken under ``room``, ``phone`` and ``noisy`` (docs/models.md) are only as good
as these degradations; each is checked on real speech against the property that defines it.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from engine.audio import SAMPLE_RATE
from evaluation.conditions import Condition, add_noise, rms, room_impulse_response, telephone
from evaluation.speech import multi_speaker_conversation


def band_share(audio: np.ndarray, low: float, high: float) -> float:
    f, p = signal.welch(audio, fs=SAMPLE_RATE, nperseg=1024)
    return float(p[(f >= low) & (f < high)].sum() / p.sum())


@pytest.fixture(scope="module")
def clean():
    return multi_speaker_conversation(seed=3)


def test_the_reference_is_the_clean_one_and_the_audio_is_not(clean):
    for name in ("room", "phone", "mobile", "narrowband", "noisy"):
        audio, reference = multi_speaker_conversation(seed=3, condition=Condition(name))
        assert reference == clean[1]
        assert len(audio) == len(clean[0])
        assert not np.allclose(audio, clean[0], atol=1e-3), name
        assert np.isfinite(audio).all() and np.abs(audio).max() <= 0.9 + 1e-6


def test_telephone_keeps_only_the_telephone_band(clean):
    line = telephone(clean[0])
    assert band_share(clean[0], 4000, 8000) > 0.005  # the clean speech has energy above the line's band
    assert band_share(line, 4000, 8000) < 1e-4
    assert band_share(line, 0, 200) < 0.01


def test_a_mobile_line_is_the_telephone_band_with_its_low_end(clean):
    audio, _ = multi_speaker_conversation(seed=3, condition=Condition("mobile"))
    line, _ = multi_speaker_conversation(seed=3, condition=Condition("phone"))
    assert band_share(audio, 4000, 8000) < 1e-4
    # what the telephone detector (engine.channel) looks for below 250 Hz is there, unlike a G.711 line
    assert band_share(audio, 100, 250) > 3 * band_share(line, 100, 250)


def test_narrowband_is_the_band_below_4_khz_alone(clean):
    audio, _ = multi_speaker_conversation(seed=3, condition=Condition("narrowband"))
    assert band_share(audio, 4200, 8000) < 1e-4
    assert band_share(audio, 0, 200) > 0.2 * band_share(clean[0], 0, 200)  # unlike a line, it keeps the lows


def test_room_response_decays_sixty_decibels_in_its_rt60():
    rir = room_impulse_response(0.6, 5.0, np.random.default_rng(0))
    assert len(rir) == int(0.6 * SAMPLE_RATE) and rir[0] == 1.0
    tail = rir[1:]
    assert 10 * np.log10(1.0 / np.sum(tail**2)) == pytest.approx(5.0, abs=0.01)  # direct-to-reverberant
    early, late = rms(rir[800:1600]), rms(rir[-1600:-800])  # 50-100 ms against 0.5-0.55 s
    assert 20 * np.log10(early / late) == pytest.approx(6.908 * 20 / np.log(10) * 0.45 / 0.6, abs=4.0)


def test_each_talker_keeps_one_room_through_a_long_meeting():
    room = Condition("room", room_seed=0)
    assert room.talkers(["a", "b"], seed=1)["a"].gain == room.talkers(["a", "b"], seed=7)["a"].gain
    assert Condition("room").talkers(["a"], seed=1)["a"].gain != Condition("room").talkers(["a"], seed=7)["a"].gain


def test_noise_sits_at_the_asked_level_below_the_speech(clean):
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(len(clean[0])).astype(np.float32)
    noisy = add_noise(clean[0], noise, 10.0)
    silence = slice(0, int(0.5 * SAMPLE_RATE))  # the conversation's lead-in holds no speech
    assert rms(clean[0][silence]) < 1e-6
    frames = clean[0][: len(clean[0]) // 400 * 400].reshape(-1, 400)
    energy = (frames.astype(np.float64) ** 2).mean(axis=1)
    speech_level = np.sqrt(energy[energy > energy.max() * 1e-4].mean())
    assert 20 * np.log10(speech_level / rms(noisy[silence])) == pytest.approx(10.0, abs=0.5)
