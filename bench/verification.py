"""Verification quality and embedding speed of the configured model.

Prints: the number of speakers/clips/trials, EER and the threshold at the EER point on real
labelled speech (../shared/data utterances + the talkers of pyannote's sample), the mean
same/different-speaker scores, and the warm time to embed a 10 s clip.

    .venv/bin/python bench/verification.py
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from shared.audio import Audio
from shared.engine import Engine
from shared.evaluation import equal_error_rate, pyannote_sample, reference_clips, speech_clips
from shared.pipelines.embedding import cosine_similarity


def labelled_clips():
    wav, rttm = pyannote_sample()
    clips = [c for c in speech_clips() if c.speaker in ("spk1", "spk2")]
    return clips + reference_clips(wav, rttm, min_duration=1.5)


def trials(engine: Engine):
    clips = labelled_clips()
    vectors = [engine.embedder.embed(Audio(c.samples)) for c in clips]
    scores, same = [], []
    for (i, a), (j, b) in itertools.combinations(enumerate(clips), 2):
        scores.append(cosine_similarity(vectors[i], vectors[j]))
        same.append(a.speaker == b.speaker)
    return clips, np.asarray(scores), np.asarray(same)


def main() -> None:
    engine = Engine()
    clips, scores, same = trials(engine)
    eer, threshold = equal_error_rate(scores, same)
    print(f"speakers={len({c.speaker for c in clips})} clips={len(clips)} "
          f"target_trials={int(same.sum())} nontarget_trials={int((~same).sum())}")
    print(f"EER={eer:.3%} threshold_at_EER={threshold:.3f} "
          f"mean_same={scores[same].mean():.3f} mean_diff={scores[~same].mean():.3f} "
          f"min_same={scores[same].min():.3f} max_diff={scores[~same].max():.3f}")
    ten = Audio(np.random.default_rng(0).standard_normal(160_000).astype(np.float32) * 0.1)
    engine.embedder.embed(ten)
    runs = []
    for _ in range(10):
        t = time.perf_counter()
        engine.embedder.embed(ten)
        runs.append(time.perf_counter() - t)
    print(f"embed_10s_warm_median={np.median(runs):.3f}s max={np.max(runs):.3f}s device={engine.model_device}")


if __name__ == "__main__":
    main()
