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
