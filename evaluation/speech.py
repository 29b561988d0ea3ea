"""Quality measurement on real speech: reference conversations, DER and EER.

Used by the benchmarks and the tests. Conversations are built from real recorded clips
(one talker each) with known turns, so their RTTM reference is exact by construction.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from engine.audio import SAMPLE_RATE, load_audio

if TYPE_CHECKING:
    from evaluation.conditions import Condition


@dataclass(frozen=True)
class Clip:
    speaker: str
    samples: np.ndarray


def pyannote_sample() -> tuple[Path, Path]:
    """The real two-speaker recording (and its RTTM) shipped inside pyannote.audio."""
    import pyannote.audio

    folder = Path(pyannote.audio.__file__).parent / "sample"
    return folder / "sample.wav", folder / "sample.rttm"


def load_reference(rttm: str | os.PathLike):
    from pyannote.database.util import load_rttm

    return next(iter(load_rttm(str(rttm)).values()))


def trim_silence(samples: np.ndarray, top_db: float = 35.0, frame: int = 400) -> np.ndarray:
    """Cut leading/trailing frames more than ``top_db`` below the loudest frame."""
    n = len(samples) // frame
    if n == 0:
        return samples
    energy = np.sqrt(np.mean(samples[: n * frame].reshape(n, frame) ** 2, axis=1)) + 1e-10
    loud = np.nonzero(20 * np.log10(energy / energy.max()) > -top_db)[0]
    if loud.size == 0:
        return samples
    return samples[loud[0] * frame : (loud[-1] + 1) * frame]


def speech_clips(data_dir: str | os.PathLike = "../shared/data/speech") -> list[Clip]:
    """Every single-talker clip of the shared speech data, trimmed to its speech span.

    utterances/spkK_sntN.wav -> speaker "spkK"; two-talker/sourceS_N.wav -> speaker "ttS_N"
    (the talkers differ between N).
    """
    clips = []
    for path in sorted(glob.glob(os.path.join(data_dir, "utterances", "*.wav"))):
        clips.append(Clip(Path(path).stem.split("_")[0], trim_silence(load_audio(path).float32())))
    for path in sorted(glob.glob(os.path.join(data_dir, "two-talker", "*.wav"))):
        stem = Path(path).stem  # source1_0
        clips.append(Clip("tt" + stem.removeprefix("source"), trim_silence(load_audio(path).float32())))
    return clips


def build_conversation(
    turns: Sequence[Clip],
    *,
    seed: int = 0,
    pause: tuple[float, float] = (0.3, 1.0),
    overlap_probability: float = 0.15,
    overlap: tuple[float, float] = (0.2, 0.6),
    lead_in: float = 1.0,
    condition: "Condition | None" = None,
):
    """Lay ``turns`` one after the other with pauses and occasional overlaps.

    Returns ``(samples, reference)``: float32 16 kHz mono audio and the pyannote ``Annotation``
    of exactly what was laid down. A ``condition`` (``evaluation.conditions``) puts each talker
    in a room or the whole conversation through a line or under noise; turns stay where they
    were laid, so the reference is the same.
    """
    from pyannote.core import Annotation, Segment

    rng = np.random.default_rng(seed)
    if condition is not None:
        talkers = condition.talkers([clip.speaker for clip in turns], seed)
        turns = [Clip(clip.speaker, talkers[clip.speaker](clip.samples)) for clip in turns]
    placed: list[tuple[int, Clip]] = []
    cursor = int(lead_in * SAMPLE_RATE)
    previous: Clip | None = None
    for clip in turns:
        if previous is not None and previous.speaker != clip.speaker and rng.random() < overlap_probability:
            shift = int(rng.uniform(*overlap) * SAMPLE_RATE)
            start = max(cursor - min(shift, len(previous.samples) // 2), 0)
        else:
            start = cursor + int(rng.uniform(*pause) * SAMPLE_RATE)
        placed.append((start, clip))
        cursor = start + len(clip.samples)
        previous = clip
    total = cursor + int(lead_in * SAMPLE_RATE)
    audio = np.zeros(total, dtype=np.float32)
    reference = Annotation(uri="conversation")
    for i, (start, clip) in enumerate(placed):
        audio[start : start + len(clip.samples)] += clip.samples
        reference[Segment(start / SAMPLE_RATE, (start + len(clip.samples)) / SAMPLE_RATE), i] = clip.speaker
    if condition is not None:
        audio = condition.mix(audio, seed)
    peak = float(np.abs(audio).max()) or 1.0
    return (audio / peak * 0.9).astype(np.float32), reference


def to_annotation(turns: Iterable, uri: str = "hypothesis"):
    from pyannote.core import Annotation, Segment

    hyp = Annotation(uri=uri)
    for i, t in enumerate(turns):
        hyp[Segment(t.start, t.end), i] = t.speaker
    return hyp


def diarization_error_rate(reference, turns: Iterable) -> float:
    """DER with pyannote.metrics, collar 0, overlap included (the strict setting)."""
    from pyannote.metrics.diarization import DiarizationErrorRate

    metric = DiarizationErrorRate(collar=0.0, skip_overlap=False)
    return float(metric(reference, to_annotation(turns)))


def equal_error_rate(scores: Sequence[float], same: Sequence[bool]) -> tuple[float, float]:
    """(EER, threshold at the EER point) from trial scores and same-speaker labels."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    if same.all() or not same.any():
        raise ValueError("need both target and non-target trials")
    best = (1.0, 0.0)
    gap = np.inf
    for t in np.unique(scores):
        frr = float(np.mean(scores[same] < t))
        far = float(np.mean(scores[~same] >= t))
        if abs(frr - far) < gap:
            gap, best = abs(frr - far), ((frr + far) / 2, float(t))
    return best


def reference_clips(wav: str | os.PathLike, rttm: str | os.PathLike, min_duration: float = 1.0) -> list[Clip]:
    """Single-talker pieces of a real recording, cut where its reference has exactly one speaker."""
    reference = load_reference(rttm)
    samples = load_audio(wav).float32()
    overlap = reference.get_overlap()
    clips = []
    for segment, _, label in reference.itertracks(yield_label=True):
        for piece in reference.get_timeline().support().crop(segment).extrude(overlap) if overlap else [segment]:
            if piece.duration >= min_duration:
                a, b = int(piece.start * SAMPLE_RATE), int(piece.end * SAMPLE_RATE)
                clips.append(Clip(str(label), samples[a:b]))
    return clips


def multi_speaker_conversation(
    data_dir: str | os.PathLike = "../shared/data/speech", seed: int = 0, condition: "Condition | None" = None
):
    """Four real talkers (the two of pyannote's sample + the two of the utterances), alternating."""
    wav, rttm = pyannote_sample()
    pools: dict[str, list[Clip]] = {}
    for clip in reference_clips(wav, rttm) + [c for c in speech_clips(data_dir) if c.speaker in ("spk1", "spk2")]:
        pools.setdefault(clip.speaker, []).append(clip)
    rng = np.random.default_rng(seed)
    speakers = sorted(pools)
    order, last, used = [], None, {s: 0 for s in speakers}
    while any(used[s] < len(pools[s]) for s in speakers):
        choices = [s for s in speakers if s != last and used[s] < len(pools[s])] or [
            s for s in speakers if used[s] < len(pools[s])
        ]
        s = str(rng.choice(choices))
        order.append(pools[s][used[s]])
        used[s] += 1
        last = s
    return build_conversation(order, seed=seed, condition=condition)


LIBRISPEECH = "librispeech-train-clean"


def librispeech_utterance(path: str | os.PathLike) -> np.ndarray:
    """One LibriSpeech reader's utterance as :func:`librispeech_clips` holds it: decoded, its
    quiet ends trimmed."""
    return trim_silence(load_audio(path).float32())


class _ClipOnDemand(Clip):
    """A LibriSpeech :class:`Clip` decoded and trimmed when its samples are first read (a frozen
    dataclass, hence ``object.__setattr__``)."""

    def __init__(self, path: str) -> None:
        object.__setattr__(self, "speaker", Path(path).name.split("-")[0])
        object.__setattr__(self, "_path", path)

    @property
    def samples(self) -> np.ndarray:  # type: ignore[override]
        if "_samples" not in self.__dict__:
            object.__setattr__(self, "_samples", librispeech_utterance(self._path))
        return self.__dict__["_samples"]


def librispeech_clips(data_dir: str | os.PathLike = "../shared/data/speech", *, lazy: bool = False) -> list[Clip]:
    """One trimmed utterance (up to 15 s) of each of the 249 LibriSpeech readers; speaker = reader id.

    ``lazy``: each clip is decoded when its samples are first read, the same samples in the same
    order. A test that draws a few readers (``many_talker_conversation(..., clips=...)`` picks by
    index) decoded all 249 first: 13-15 s of a 2-core host, for the two to eight it used."""
    clips = [_ClipOnDemand(path) for path in sorted(glob.glob(os.path.join(data_dir, LIBRISPEECH, "*.ogg")))]
    return clips if lazy else [Clip(clip.speaker, clip.samples) for clip in clips]


def split_clip(clip: Clip, rng: np.random.Generator, piece_s: tuple[float, float] = (2.0, 4.0)) -> list[Clip]:
    """Cut one utterance into consecutive turns of ``piece_s`` seconds (a short tail joins the last)."""
    pieces, start, n = [], 0, len(clip.samples)
    while start < n:
        length = int(rng.uniform(*piece_s) * SAMPLE_RATE)
        if n - (start + length) < piece_s[0] * SAMPLE_RATE:
            length = n - start
        pieces.append(Clip(clip.speaker, clip.samples[start : start + length]))
        start += length
    return pieces


def many_talker_conversation(
    talkers: int,
    *,
    minor: int = 0,
    seed: int = 0,
    clips: Sequence[Clip] | None = None,
    data_dir: str | os.PathLike = "../shared/data/speech",
    condition: "Condition | None" = None,
):
    """A conversation of ``talkers`` LibriSpeech readers, ``minor`` of whom say only 3-6 s.

    Main talkers' utterances are cut into 2-4 s turns and interleaved at random (never the same
    talker twice in a row when avoidable); a minor talker keeps one or two turns of their
    utterance. Pauses and overlaps as in :func:`build_conversation`. Returns (samples, reference).
    """
    rng = np.random.default_rng(seed)
    chosen = pick_talkers(talkers, rng, clips, data_dir)
    turns: list[Clip] = []
    for i, clip in enumerate(chosen):
        pieces = split_clip(clip, rng)
        turns.extend(minor_turns(pieces) if i < minor else pieces)
    return build_conversation(interleave(turns, rng), seed=seed, condition=condition)


def pick_talkers(talkers: int, rng: np.random.Generator, clips: Sequence[Clip] | None,
                 data_dir: str | os.PathLike) -> list[Clip]:
    """``talkers`` distinct readers' utterances, drawn from ``clips`` (LibriSpeech's by default)."""
    pool = list(clips) if clips is not None else librispeech_clips(data_dir)
    return [pool[i] for i in rng.choice(len(pool), size=talkers, replace=False)]


def minor_turns(pieces: Sequence[Clip]) -> list[Clip]:
    """The first of a minor talker's ``pieces`` up to 3 s of speech (one or two turns)."""
    keep, total = [], 0
    for piece in pieces:
        keep.append(piece)
        total += len(piece.samples)
        if total >= 3 * SAMPLE_RATE:
            break
    return keep


def interleave(turns: Sequence[Clip], rng: np.random.Generator) -> list[Clip]:
    """``turns`` in a random order, never the same talker twice in a row when avoidable."""
    order: list[Clip] = []
    remaining = list(rng.permutation(len(turns)))
    while remaining:
        last = order[-1].speaker if order else None
        pick = next((k for k in remaining if turns[k].speaker != last), remaining[0])
        remaining.remove(pick)
        order.append(turns[pick])
    return order


def _voiced_piece(clip: Clip, rng: np.random.Generator, seconds: tuple[float, float],
                  frame: int = 160, floor_db: float = -30.0, tries: int = 50) -> np.ndarray | None:
    """A 0.3-1.2 s-like piece of ``clip`` with speech from its first to its last 10 ms frame.

    A piece of read speech can fall in a pause between words; its quiet ends (frames more than
    ``floor_db`` below the clip's loudest) are cut and a piece left shorter than ``seconds[0]``
    is drawn again, so the reference's segment is speech, as a backchannel is.
    """
    n = len(clip.samples) // frame
    energy = np.sqrt(np.mean(clip.samples[: n * frame].reshape(n, frame) ** 2, axis=1)) + 1e-10
    loud = 20 * np.log10(energy / energy.max()) > floor_db
    for _ in range(tries):
        length = int(rng.uniform(*seconds) * SAMPLE_RATE) // frame
        if length >= n:
            continue
        first = int(rng.integers(0, n - length))
        voiced = np.nonzero(loud[first : first + length])[0]
        if voiced.size == 0:
            continue
        a, b = first + voiced[0], first + voiced[-1] + 1
        if (b - a) * frame >= seconds[0] * SAMPLE_RATE and loud[a:b].mean() > 0.7:
            return clip.samples[a * frame : b * frame]
    return None


def meeting_conversation(
    talkers: int,
    *,
    minor: int = 0,
    seed: int = 0,
    clips: Sequence[Clip] | None = None,
    data_dir: str | os.PathLike = "../shared/data/speech",
    passes: tuple[int, int] = (2, 3),
    turn_s: tuple[float, float] = (2.0, 6.0),
    overlap_probability: float = 0.4,
    overlap: tuple[float, float] = (0.5, 2.0),
    interjections_per_minute: float = 6.0,
    interjection_s: tuple[float, float] = (0.3, 1.2),
    interjection_gain: tuple[float, float] = (0.5, 1.0),
):
    """A meeting-like conversation of ``talkers`` LibriSpeech readers with overlaps and backchannels.

    Unlike :func:`many_talker_conversation` (15 % of turn changes overlapping by 0.2-0.6 s), turn
    changes overlap often and long (``overlap_probability``, ``overlap`` seconds; at most half the
    previous turn, as :func:`build_conversation` lays them), and short interjections - 0.3-1.2 s
    voiced pieces of a talker's own utterance, like "yeah" or "mm-hmm" - are laid inside other
    talkers' turns, where only that other talker speaks, at 0.5-1.0 of the host turn's loudness.

    Each reader has one 15 s utterance, so a main talker's is cut (:func:`split_clip`) into
    ``turn_s`` turns ``passes`` times over (2 or 3 times, drawn per talker: unequal talk time),
    with different cuts each pass; ``minor`` talkers keep one or two turns (3-6 s) of theirs and
    speak otherwise only in interjections. Deterministic by ``seed``. Returns ``(samples,
    reference)``: float32 16 kHz audio at peak 0.9 and the exact pyannote ``Annotation``.
    """
    from pyannote.core import Segment

    rng = np.random.default_rng(seed)
    chosen = pick_talkers(talkers, rng, clips, data_dir)
    turns: list[Clip] = []
    for i, clip in enumerate(chosen):
        if i < minor:
            turns.extend(minor_turns(split_clip(clip, rng, turn_s)))
        else:
            for _ in range(int(rng.integers(passes[0], passes[1] + 1))):
                turns.extend(split_clip(clip, rng, turn_s))
    audio, reference = build_conversation(
        interleave(turns, rng), seed=seed, overlap_probability=overlap_probability, overlap=overlap)
    audio = audio.astype(np.float64)

    # Backchannels: inside a host turn, in a stretch where only the host speaks (clear of overlaps
    # and earlier interjections by 0.2 s), by a talker other than the host.
    hosts = [(segment, label) for segment, _, label in reference.itertracks(yield_label=True)]
    wanted = int(round(interjections_per_minute * len(audio) / SAMPLE_RATE / 60))
    laid, attempts = 0, 0
    while laid < wanted and attempts < 50 * max(wanted, 1):
        attempts += 1
        host_segment, host = hosts[int(rng.integers(len(hosts)))]
        speaker = chosen[int(rng.integers(talkers))]
        if speaker.speaker == host:
            continue
        piece = _voiced_piece(speaker, rng, interjection_s)
        if piece is None:
            continue
        duration = len(piece) / SAMPLE_RATE
        room = host_segment.duration - duration - 0.6
        if room <= 0:
            continue
        start = host_segment.start + 0.3 + float(rng.uniform(0, room))
        around = Segment(start - 0.2, start + duration + 0.2)
        if set(reference.crop(around).labels()) != {host} or len(reference.crop(around)) != 1:
            continue
        a = int(round(start * SAMPLE_RATE))
        host_rms = float(np.sqrt(np.mean(audio[a : a + len(piece)] ** 2)))
        piece_rms = float(np.sqrt(np.mean(piece.astype(np.float64) ** 2))) or 1.0
        audio[a : a + len(piece)] += piece * (host_rms / piece_rms * rng.uniform(*interjection_gain))
        reference[Segment(a / SAMPLE_RATE, (a + len(piece)) / SAMPLE_RATE), f"i{laid}"] = speaker.speaker
        laid += 1
    reference.uri = "meeting"
    peak = float(np.abs(audio).max()) or 1.0
    return (audio / peak * 0.9).astype(np.float32), reference


# talkers of a panel (`panel_conversation`), by seed: a debate or a radio round table
PANEL_TALKERS = (10, 12, 14, 16)


def panel_conversation(seed: int, *, clips: Sequence[Clip] | None = None,
                       data_dir: str | os.PathLike = "../shared/data/speech"):
    """A panel of 10-16 LibriSpeech readers (``PANEL_TALKERS[seed % 4]``), 2-4 of them minor.

    The many-speaker recordings users send (a debate, a round table, a broadcast) hold more
    talkers than the 5-8 of :func:`many_talker_conversation`, for minutes, with talk time far
    from equal. Built as a :func:`meeting_conversation` whose main talkers say their utterance
    one to four times over (4-60 s each), with fewer and shorter overlaps (15 % of turn changes,
    0.2-1.0 s: one talker has the floor) and two interjections a minute. 4-9 minutes; deterministic
    by ``seed``. Returns ``(samples, reference)`` as that function does.
    """
    return meeting_conversation(PANEL_TALKERS[seed % len(PANEL_TALKERS)], minor=2 + seed % 3, seed=seed,
                                clips=clips, data_dir=data_dir, passes=(1, 4), overlap_probability=0.15,
                                overlap=(0.2, 1.0), interjections_per_minute=2.0)
