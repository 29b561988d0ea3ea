"""A recording's channel: a telephone line is recognised, and clustered with its own threshold.

Real speech laid out by ``evaluation.conditions`` (a simulated G.711 line: 300-3400 Hz, mu-law,
line noise), against the same speech as recorded, at 8 kHz, in a room and under noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.audio import Audio, load_audio
from engine.channel import through_a_telephone_line
from evaluation.conditions import Condition
from evaluation.speech import (
    diarization_error_rate,
    librispeech_clips,
    many_talker_conversation,
    multi_speaker_conversation,
    pyannote_sample,
)


@pytest.fixture(scope="module")
def clips():
    # the pool the seeds draw from, decoding only the readers drawn (all 249 took 13-15 s)
    return librispeech_clips(lazy=True)


@pytest.mark.parametrize("condition", [None, "narrowband", "room", "noisy", "phone"])
def test_a_telephone_line_is_told_from_microphones_and_narrowband_recordings(clips, condition):
    made = Condition(condition) if condition else None
    recordings = [multi_speaker_conversation(seed=9, condition=made)[0]] + [
        many_talker_conversation(talkers, seed=700 + talkers, clips=clips, condition=made)[0] for talkers in (1, 2, 6)
    ]
    assert [through_a_telephone_line(r) for r in recordings] == [condition == "phone"] * 4


def test_pyannotes_narrowband_sample_is_not_a_telephone_line():
    wav, _ = pyannote_sample()
    assert not through_a_telephone_line(load_audio(wav).samples)


def test_silence_and_a_tiny_clip_are_not_a_telephone_line():
    assert not through_a_telephone_line(np.zeros(16000, dtype=np.float32))
    assert not through_a_telephone_line(np.full(100, 0.1, dtype=np.float32))


def test_four_talkers_on_a_line_are_not_merged_into_two():
    """At the microphone threshold a four-talker call came out as two speakers (DER 0.5+)."""
    from engine.core import Engine
    from shared.settings import Settings

    samples, reference = multi_speaker_conversation(seed=2, condition=Condition("phone"))

    def diarize(telephone_threshold):
        engine = Engine(Settings(clustering_telephone_threshold=telephone_threshold))
        turns = engine.diarize(Audio(samples)).diarization_results
        return diarization_error_rate(reference, turns), len({t.speaker for t in turns})

    (der_line, found_line), (der_mic, found_mic) = diarize(0.65), diarize(None)
    assert found_mic <= 2 and der_mic > 0.45  # the collapse, with one threshold for all
    assert found_line >= 3 and der_line < 0.35, (der_line, found_line)
