"""A call centre's recordings (trial, 2026-12-05): agent and customer through a telephone line, in
the forms call recorders write them.

The stereo form (agent on the left channel, customer on the right) was mixed down to mono and
clustered like any recording: a 3 min stereo mu-law call came out at DER 0.53 (the two voices
swapped for 40 % of the speech), and SPEAKER_00 was whoever spoke first. Such a file is now
diarized by its channels (engine.channel.separated, Engine.talker_channels): SPEAKER_00 is the
left channel's talker, SPEAKER_01 the right's, and a back-channel on its own channel survives.
Audio is built here from ../shared/data's LibriSpeech readers (nothing copied into the repo).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from engine.audio import SAMPLE_RATE, load_audio, load_channel
from engine.channel import separated
from evaluation.speech import LIBRISPEECH, librispeech_utterance

RATE = 8000


# the two longest readers of the pool (evaluation.speech.librispeech_clips sorted by trimmed
# length, first in file order among the 15 s ones), named: finding them decoded all 249 (15 s)
READERS = Path("../shared/data/speech") / LIBRISPEECH
LONGEST = ("1235-135883-0000.ogg", "1737-142396-0000.ogg")


@pytest.fixture(scope="module")
def talkers():
    # a woman and a man would be easy for any clustering; two long readers of the pool
    return tuple(librispeech_utterance(READERS / name) for name in LONGEST)


@pytest.fixture(scope="module")
def engine():
    from engine.core import Engine

    return Engine()


def _line(x16: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """A G.711 line: 8 kHz, 300-3400 Hz, line noise, mu-law (the WAV writer's)."""
    y = signal.resample_poly(x16, 1, 2)
    y = signal.sosfilt(signal.butter(6, [300, 3400], btype="bandpass", fs=RATE, output="sos"), y)
    return (y + rng.standard_normal(len(y)) * noise).astype(np.float32)


def _call(agent: np.ndarray, customer: np.ndarray, seed: int = 0):
    """Two 16 kHz tracks on one timeline: the customer speaks first, turns of 2-4 s with pauses
    and overlaps, and the customer says a 0.4 s back-channel in the middle of each long agent
    turn. Returns (agent track, customer track, reference turns (start, end, who), back-channels)."""
    rng = np.random.default_rng(seed)
    scale = lambda x: x / (np.sqrt(np.mean(x**2)) + 1e-9) * 0.08  # noqa: E731
    sources = {"agent": scale(agent), "customer": scale(customer)}
    total = 36 * SAMPLE_RATE
    tracks = {who: np.zeros(total + 6 * SAMPLE_RATE, np.float32) for who in sources}
    turns, backchannels = [], []
    cursor, who = SAMPLE_RATE, "customer"
    while cursor < total:
        src = sources[who]
        n = int(rng.uniform(2.0, 4.0) * SAMPLE_RATE)
        s = int(rng.integers(0, len(src) - n))
        tracks[who][cursor : cursor + n] += src[s : s + n]
        turns.append((cursor / SAMPLE_RATE, (cursor + n) / SAMPLE_RATE, who))
        if who == "agent" and n > 2.5 * SAMPLE_RATE:
            b = int(0.4 * SAMPLE_RATE)
            c = sources["customer"]
            frames = (c[: len(c) // 400 * 400].reshape(-1, 400) ** 2).mean(1)
            bs = int(np.argmax(frames)) * 400
            at = cursor + n // 2
            tracks["customer"][at : at + b] += c[bs : bs + b] * np.hanning(b)
            backchannels.append((at / SAMPLE_RATE, (at + b) / SAMPLE_RATE))
        overlap = rng.random() < 0.25
        cursor += n + int((-rng.uniform(0.2, 0.5) if overlap else rng.uniform(0.3, 0.9)) * SAMPLE_RATE)
        who = "agent" if who == "customer" else "customer"
    return tracks["agent"], tracks["customer"], turns, backchannels


def _stereo_wav(path, left: np.ndarray, right: np.ndarray) -> None:
    sf.write(path, np.clip(np.stack([left, right], 1), -1, 1), RATE, subtype="ULAW")


def _speaker_of(result, start: float, end: float) -> dict[str, float]:
    """Seconds of [start, end] each reported speaker covers."""
    out: dict[str, float] = {}
    for t in result.diarization_results:
        overlap = min(end, t.end) - max(start, t.start)
        if overlap > 0:
            out[t.speaker] = out.get(t.speaker, 0.0) + overlap
    return out


def _echo(x: np.ndarray, db: float = 20.0, delay_s: float = 0.03) -> np.ndarray:
    """The far end's voice leaking back, ``db`` down and late (what echo cancellers leave)."""
    d = int(delay_s * RATE)
    return np.concatenate([np.zeros(d, np.float32), x[:-d]]) * np.float32(10 ** (-db / 20))


def test_a_stereo_call_is_diarized_by_its_channels(engine, talkers, tmp_path):
    rng = np.random.default_rng(1)
    agent, customer, turns, backchannels = _call(*talkers)
    left, right = _line(agent, rng, 3e-4), _line(customer, rng, 1e-3)
    path = tmp_path / "call.wav"
    # each side hears the other's echo 20 dB down: a speech detector on one channel finds the
    # other talker there too (with it kept, the agent was reported over 38 % of the customer)
    _stereo_wav(path, left + _echo(right), right + _echo(left))

    result = engine.diarize(str(path), num_speakers=2)

    # the customer speaks first, yet SPEAKER_00 is the left channel: the agent
    names = {"agent": "SPEAKER_00", "customer": "SPEAKER_01"}
    right = total = 0.0
    for start, end, who in turns:
        covered = _speaker_of(result, start + 0.25, end - 0.25)
        right += covered.get(names[who], 0.0)
        total += end - start - 0.5
    assert right / total > 0.85, (right / total, result.diarization_results[:6])
    wrong = sum(_speaker_of(result, s + 0.25, e - 0.25).get(names["customer" if w == "agent" else "agent"], 0.0)
                for s, e, w in turns if not any(bs < e and be > s for bs, be in backchannels))
    assert wrong / total < 0.1
    # every back-channel said over the agent is a customer turn of its own
    assert backchannels
    heard = [_speaker_of(result, bs, be).get("SPEAKER_01", 0.0) >= 0.5 * (be - bs) for bs, be in backchannels]
    assert all(heard), heard
    # exclusive: one speaker at a time, the agent keeping the floor over the back-channel
    alone = engine.diarize(str(path), num_speakers=2, exclusive=True).diarization_results
    ordered = sorted(alone, key=lambda t: t.start)
    assert all(a.end <= b.start + 1e-3 for a, b in zip(ordered, ordered[1:]))
    assert {t.speaker for t in alone} == {"SPEAKER_00", "SPEAKER_01"}


def test_a_channel_decodes_alone_and_the_mean_gives_back_the_other(talkers, tmp_path):
    rng = np.random.default_rng(2)
    agent, customer, _, _ = _call(*talkers, seed=3)
    left, right = _line(agent[: 8 * SAMPLE_RATE], rng, 3e-4), _line(customer[: 8 * SAMPLE_RATE], rng, 1e-3)
    path = tmp_path / "call.wav"
    sf.write(path, np.stack([left, right], 1), RATE, subtype="PCM_16")
    mix = load_audio(str(path))
    alone = load_channel(str(path), 0)
    assert mix.channels == 2 and alone.channels == 2
    expected_left = signal.resample_poly(left, 2, 1)
    n = min(len(expected_left), len(alone.samples))
    assert np.corrcoef(alone.float32()[:n], expected_left[:n])[0, 1] > 0.99
    derived = 2 * mix.float32() - alone.float32()
    expected_right = signal.resample_poly(right, 2, 1)
    assert np.corrcoef(derived[:n], expected_right[:n])[0, 1] > 0.99
    assert load_audio(str(tmp_path / "call.wav")).channels == 2


def test_channels_that_do_not_each_carry_a_talker_are_mixed_as_before(engine, talkers, tmp_path):
    rng = np.random.default_rng(4)
    agent, customer, _, _ = _call(*talkers, seed=5)
    a16, c16 = signal.resample_poly(_line(agent, rng, 3e-4), 2, 1), signal.resample_poly(_line(customer, rng, 1e-3), 2, 1)
    mixed = a16 + c16
    quiet = rng.standard_normal(len(mixed)).astype(np.float32) * 3e-5
    assert separated(a16, c16)
    assert not separated(mixed, mixed)  # dual mono
    assert not separated(mixed, quiet)  # a one-sided recording
    assert not separated(mixed, 0.5 * mixed + 0.5 * np.roll(mixed, 40))  # two microphones in one room
    # a separated stereo call asked for three speakers is clustered on its mix
    path = tmp_path / "call.wav"
    _stereo_wav(path, a16[::2], c16[::2])
    audio = engine.load(str(path))
    assert engine.talker_channels(str(path), audio) is not None
    assert not engine._two_talkers_possible(3, None, None)
    assert not engine._two_talkers_possible(None, 3, None)
    assert engine._two_talkers_possible(None, None, None)
    one_sided = tmp_path / "one-sided.wav"
    _stereo_wav(one_sided, mixed[::2], quiet[::2])
    assert engine.talker_channels(str(one_sided), engine.load(str(one_sided))) is None


def test_a_stereo_call_names_the_agent_from_their_own_channel(engine, talkers, tmp_path):
    from shared.kinds import VoiceprintRef

    rng = np.random.default_rng(6)
    agent, customer = talkers
    half = len(agent) // 2
    # enrolled from an earlier call: the agent's first half, through the same kind of line
    enrol = tmp_path / "enrol.wav"
    sf.write(enrol, _line(agent[:half], rng, 3e-4), RATE, subtype="ULAW")
    vp = engine.enroll([str(enrol)], label="Agent")
    ref = VoiceprintRef(id="vp_agent", label="Agent", model=vp.model, embedding=vp.embedding)
    a, c, _, _ = _call(agent[half:], customer, seed=7)
    path = tmp_path / "call.wav"
    _stereo_wav(path, _line(a, rng, 3e-4), _line(c, rng, 1e-3))
    result = engine.diarize(str(path), num_speakers=2, voiceprints=[ref])
    named = {s.speaker: s.identity for s in result.speakers}
    assert named == {"SPEAKER_00": "Agent", "SPEAKER_01": None}, result.speakers


def test_a_stereo_call_whose_channel_does_not_decode_alone_is_diarized_on_its_mix(engine, talkers, tmp_path,
                                                                                  monkeypatch):
    import engine.core as core
    from shared.errors import AudioDecodeError

    rng = np.random.default_rng(8)
    agent, customer, _, _ = _call(*talkers, seed=9)
    path = tmp_path / "call.wav"
    n = 12 * SAMPLE_RATE
    _stereo_wav(path, _line(agent[:n], rng, 3e-4), _line(customer[:n], rng, 1e-3))
    assert engine.talker_channels(str(path), engine.load(str(path))) is not None

    def refuse(*args, **kwargs):
        raise AudioDecodeError("a channel of this file cannot be decoded alone")

    monkeypatch.setattr(core, "load_channel", refuse)
    assert engine.talker_channels(str(path), engine.load(str(path))) is None
    assert engine.diarize(str(path), num_speakers=2).diarization_results
