"""The meeting-like conversations' references are exact: what the reference says is what was laid.

``evaluation.speech.meeting_conversation`` is the set the clustering is checked on for long
overlaps and backchannels (docs/models.md, "Meetings with overlaps and interjections"); its DER is
only as true as its reference. Built here from five real LibriSpeech readers (loading all 249
takes seconds).
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from engine.audio import SAMPLE_RATE, load_audio
from evaluation.speech import LIBRISPEECH, Clip, meeting_conversation, trim_silence

DATA = "../shared/data/speech"


@pytest.fixture(scope="module")
def clips() -> list[Clip]:
    paths = sorted(glob.glob(os.path.join(DATA, LIBRISPEECH, "*.ogg")))[:5]
    assert len(paths) == 5
    return [Clip(os.path.basename(p).split("-")[0], trim_silence(load_audio(p).float32())) for p in paths]


@pytest.fixture(scope="module")
def meeting(clips):
    return meeting_conversation(4, minor=1, seed=7, clips=clips)


def laid_turns(reference):
    """(segment, label) of the turns (integer tracks) and of the interjections ("iK" tracks)."""
    turns, interjections = [], []
    for segment, track, label in reference.itertracks(yield_label=True):
        (interjections if str(track).startswith("i") else turns).append((segment, label))
    return turns, interjections


def test_same_seed_same_meeting_other_seed_another(clips, meeting):
    audio, reference = meeting_conversation(4, minor=1, seed=7, clips=clips)
    assert np.array_equal(audio, meeting[0]) and reference == meeting[1]
    other_audio, other = meeting_conversation(4, minor=1, seed=8, clips=clips)
    assert other != reference


def test_each_talkers_turns_are_their_whole_utterance_once_per_pass(clips, meeting):
    _, reference = meeting
    turns, _ = laid_turns(reference)
    length = {c.speaker: len(c.samples) / SAMPLE_RATE for c in clips}
    spoken: dict[str, float] = {}
    for segment, label in turns:
        spoken[label] = spoken.get(label, 0.0) + segment.duration
    assert len(spoken) == 4
    minors = [s for s, d in spoken.items() if d < length[s] - 0.01]
    assert len(minors) == 1 and 3.0 <= spoken[minors[0]] <= length[minors[0]]
    for speaker, seconds in spoken.items():
        if speaker not in minors:
            passes = seconds / length[speaker]
            assert round(passes) in (2, 3) and abs(passes - round(passes)) < 1e-3, (speaker, passes)


def test_interjections_are_short_and_inside_someone_elses_turn(meeting):
    audio, reference = meeting
    turns, interjections = laid_turns(reference)
    minutes = len(audio) / SAMPLE_RATE / 60
    assert abs(len(interjections) - 6.0 * minutes) <= 1
    for segment, label in interjections:
        assert 0.3 - 0.011 <= segment.duration <= 1.2 + 0.011
        hosts = [(s, l) for s, l in turns if s.start < segment.start and segment.end < s.end]
        assert len(hosts) == 1 and hosts[0][1] != label
        # only the host and the interjection there: no overlap of turns, no other interjection
        assert len(list(reference.crop(segment).itertracks())) == 2


def test_the_audio_is_the_reference(clips, meeting):
    """Built again without interjections, the two differ exactly inside the interjections' segments
    (up to the peak normalisation), every interjection is voiced to its ends, and the recording is
    silent exactly where its reference has nobody."""
    audio, reference = meeting
    plain, plain_reference = meeting_conversation(4, minor=1, seed=7, clips=clips, interjections_per_minute=0)
    _, interjections = laid_turns(reference)
    assert len(plain) == len(audio) and len(plain_reference) == len(reference) - len(interjections)
    inside = np.zeros(len(audio), dtype=bool)
    for segment, _ in interjections:
        inside[round(segment.start * SAMPLE_RATE) : round(segment.end * SAMPLE_RATE)] = True
    scale = np.dot(audio[~inside], plain[~inside]) / np.dot(plain[~inside], plain[~inside])
    difference = audio.astype(np.float64) - scale * plain
    assert np.abs(difference[~inside]).max() < 1e-5
    for segment, _ in interjections:
        a, b = round(segment.start * SAMPLE_RATE), round(segment.end * SAMPLE_RATE)
        assert np.sqrt(np.mean(difference[a : a + 160] ** 2)) > 1e-4
        assert np.sqrt(np.mean(difference[b - 160 : b] ** 2)) > 1e-4
    speech = np.zeros(len(audio), dtype=bool)
    for segment in reference.get_timeline().support():
        speech[round(segment.start * SAMPLE_RATE) : round(segment.end * SAMPLE_RATE)] = True
    assert not audio[~speech].any()


def test_turn_changes_overlap_often_and_long(meeting):
    _, reference = meeting
    turns, _ = laid_turns(reference)
    turns.sort(key=lambda t: t[0].start)
    changes = [(a, b) for (a, la), (b, lb) in zip(turns, turns[1:]) if la != lb]
    overlaps = [a.end - b.start for a, b in changes if b.start < a.end]
    assert len(overlaps) >= 0.25 * len(changes)
    assert max(overlaps) > 1.0 and all(o <= 2.0 + 1e-6 for o in overlaps)
    # the overlapped time in the reference is the turns' overlaps plus the interjections
    assert reference.get_overlap().duration() >= sum(overlaps) - 1e-3


def test_guests_are_laid_whole_in_pauses_and_the_meeting_moves_later_intact(clips) -> None:
    """``with_minor_talkers`` (bench/tune_diarization.py --long-guests): each guest's segment is
    their own audio at one gain, laid in silence; cutting the guests' blocks out gives back the
    meeting sample for sample, and its reference moved to the new timeline."""
    from pyannote.core import Segment

    from evaluation.longform import with_minor_talkers

    audio, reference = meeting_conversation(3, seed=3, clips=clips[:3], interjections_per_minute=0)
    guests = clips[3:]
    laid, moved, labels = with_minor_talkers(audio, reference, guests, 2, seed=11)
    assert sorted(labels) == sorted(f"minor-{c.speaker}" for c in guests)
    assert with_minor_talkers(audio, reference, guests, 2, seed=11)[1] == moved

    blocks = []
    for label in labels:
        (segment,) = moved.label_timeline(label)
        assert 3.0 - 0.01 <= segment.duration <= 6.0 + 0.01
        a, b = round(segment.start * SAMPLE_RATE), round(segment.end * SAMPLE_RATE)
        own = next(c.samples for c in guests if f"minor-{c.speaker}" == label)[: b - a].astype(np.float64)
        gain = float(np.dot(laid[a:b], own) / np.dot(own, own))
        assert gain > 0 and np.allclose(laid[a:b], own * gain, atol=1e-4)
        # half a second of silence either side, where nobody else speaks
        half = SAMPLE_RATE // 2
        assert not laid[a - half : a].any() and not laid[b : b + half].any()
        assert moved.crop(Segment(segment.start - 0.5, segment.end + 0.5)).labels() == [label]
        blocks.append((a - half, b + half))

    kept = np.concatenate([laid[start:end] for start, end in
                           zip([0] + [e for _, e in sorted(blocks)], [s for s, _ in sorted(blocks)] + [len(laid)])])
    assert np.array_equal(kept, audio)
    # every turn of the meeting keeps its length and order, each moved by the blocks before it
    before = sorted((s.start, s.end, label) for s, _, label in reference.itertracks(yield_label=True))
    after = sorted((s.start, s.end, label) for s, _, label in moved.itertracks(yield_label=True) if label not in labels)
    assert [b[2] for b in before] == [a[2] for a in after]
    for (s0, e0, _), (s1, e1, _) in zip(before, after):
        shift = sum((e - s) / SAMPLE_RATE for s, e in blocks if s / SAMPLE_RATE < s1)
        assert abs((s1 - s0) - shift) < 1e-3 and abs((e1 - s1) - (e0 - s0)) < 1e-6
