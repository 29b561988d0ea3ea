"""Long reference recordings for speed and memory benchmarks, laid from real speech."""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.audio import SAMPLE_RATE


def long_conversation(minutes: float, data_dir: str = "../shared/data/speech", condition=None, first_seed: int = 0):
    """About ``minutes`` of real four-talker conversation with its exact reference.

    Successive 55 s conversations (different seeds, so different turn orders, pauses and
    overlaps) of the same four talkers, as in a long meeting.
    """
    from pyannote.core import Annotation, Segment

    from evaluation.speech import multi_speaker_conversation

    if condition is not None:
        condition = dataclasses.replace(condition, room_seed=0)

    target = int(minutes * 60 * SAMPLE_RATE)
    pieces, reference, offset, seed = [], Annotation(uri="long"), 0, first_seed
    while offset < target:
        samples, ref = multi_speaker_conversation(data_dir, seed=seed, condition=condition)
        gain = float(np.random.default_rng(seed).uniform(0.5, 1.0))
        pieces.append(samples * gain)
        for segment, track, label in ref.itertracks(yield_label=True):
            reference[Segment(segment.start + offset / SAMPLE_RATE, segment.end + offset / SAMPLE_RATE), (seed, track)] = label
        offset += len(samples)
        seed += 1
    return np.concatenate(pieces).astype(np.float32), reference


def with_minor_talkers(samples: np.ndarray, reference, clips, talkers: int, *, seed: int,
                       speech_s: tuple[float, float] = (3.0, 6.0), pause_s: float = 0.5):
    """``samples`` with ``talkers`` readers of ``clips`` added who each speak once, ``speech_s``
    seconds: the guest who says one thing in a long meeting, a caller put through on a podcast.

    Each is laid in a pause of ``reference`` (0.2 s or longer, where nobody speaks, drawn by
    ``seed``), with ``pause_s`` of silence either side, at the loudness of the 10 s around it;
    everything after moves later, so every turn of ``reference`` keeps its audio whole. Returns
    ``(samples, reference, labels)``: the new audio, its exact reference and the added talkers'
    labels (``minor-<reader>``).
    """
    from pyannote.core import Annotation, Segment

    rng = np.random.default_rng(seed)
    chosen = [clips[i] for i in rng.choice(len(clips), size=talkers, replace=False)]
    total_s = len(samples) / SAMPLE_RATE
    pauses = [g for g in reference.get_timeline().support().gaps(Segment(0.0, total_s)) if g.duration >= 0.2]
    picked = sorted(pauses[i].middle for i in rng.choice(len(pauses), size=talkers, replace=False))
    silence = np.zeros(int(round(pause_s * SAMPLE_RATE)), dtype=np.float32)

    pieces, laid, last = [], [], 0
    for at_s, clip in zip(picked, chosen):
        at = int(round(at_s * SAMPLE_RATE))
        piece = clip.samples[: int(rng.uniform(*speech_s) * SAMPLE_RATE)].astype(np.float64)
        around = samples[max(0, at - 5 * SAMPLE_RATE): at + 5 * SAMPLE_RATE].astype(np.float64)
        gain = float(np.sqrt(np.mean(around ** 2)) / (np.sqrt(np.mean(piece ** 2)) or 1.0))
        pieces += [samples[last:at], silence, (piece * gain).astype(np.float32), silence]
        laid.append((at / SAMPLE_RATE, len(piece) / SAMPLE_RATE, f"minor-{clip.speaker}"))
        last = at
    pieces.append(samples[last:])

    def later(t: float) -> float:  # a time of ``reference`` on the new timeline
        return t + sum(2 * pause_s + length for at, length, _ in laid if at <= t)

    moved = Annotation(uri=reference.uri)
    for segment, track, label in reference.itertracks(yield_label=True):
        moved[Segment(later(segment.start), later(segment.end)), track] = label
    for at, length, label in laid:
        start = later(at) - pause_s - length  # ``later`` counts this talker's own block
        moved[Segment(start, start + length), label] = label
    return np.concatenate(pieces).astype(np.float32), moved, [label for _, _, label in laid]
