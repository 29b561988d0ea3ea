"""Verification quality and embedding speed of the configured model.

Prints, for two sets of real labelled speech: the number of speakers and trials, EER and the
threshold at the EER point, mean same/different-speaker scores, and false accept / false reject
rates at the engine's default threshold; then the warm time to embed a 10 s clip.

Each set is scored twice in one run: as the service embeds (``Engine.embedding_vector``: the
speech the detector hears), and ``whole`` (every sample, silence and background included);
``--noise-pad S`` puts S seconds of one room-noise recording (at -20 dB to the speech) around
every clip, the same for all, as two callers on one line share its noise.

- utterances + sample: the ../shared/data utterances and single-talker stretches of pyannote's
  sample (4 speakers, all pairs);
- LibriSpeech halves: 249 readers, the first half of each one's utterance against the second
  half of every one's (249 target, 61,752 impostor trials).

    .venv/bin/python bench/verification.py
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from engine.audio import Audio
from engine.core import Engine
from evaluation.speech import equal_error_rate, pyannote_sample, reference_clips, speech_clips
from engine.pipelines.embedding import cosine_similarity


def labelled_clips():
    wav, rttm = pyannote_sample()
    clips = [c for c in speech_clips() if c.speaker in ("spk1", "spk2")]
    return clips + reference_clips(wav, rttm, min_duration=1.5)


def embedders(engine: Engine, pad_s: float):
    """(name, samples -> vector) for the service's embedding and the whole-recording one."""
    noise = None
    if pad_s > 0:
        import glob

        from engine.audio import load_audio

        noise = load_audio(sorted(glob.glob("../shared/data/speech/noise/*.wav"))[0]).float32()[: int(pad_s * 16000)]

    def padded(x: np.ndarray) -> np.ndarray:
        if noise is None:
            return x
        level = np.sqrt(np.mean(x.astype(np.float64) ** 2)) / max(np.sqrt(np.mean(noise.astype(np.float64) ** 2)), 1e-9)
        n = noise * level * 10 ** (-20 / 20)
        return np.concatenate([n, x, n[: len(n) // 2]]).astype(np.float32)

    return [("speech", lambda x: engine.embedding_vector(Audio(padded(x)))[0]),
            ("whole", lambda x: engine.embedder.embed(Audio(padded(x))))]


def trials(embed):
    clips = labelled_clips()
    vectors = [embed(c.samples) for c in clips]
    scores, same = [], []
    for (i, a), (j, b) in itertools.combinations(enumerate(clips), 2):
        scores.append(cosine_similarity(vectors[i], vectors[j]))
        same.append(a.speaker == b.speaker)
    return clips, np.asarray(scores), np.asarray(same)


def librispeech_trials(embed):
    """249 readers: the first half of each one's utterance against the second half of every one's."""
    from evaluation.speech import librispeech_clips

    clips = librispeech_clips()
    halves = [(c.samples[: len(c.samples) // 2], c.samples[len(c.samples) // 2 :]) for c in clips]
    first = np.stack([embed(a) for a, _ in halves])
    second = np.stack([embed(b) for _, b in halves])
    first /= np.linalg.norm(first, axis=1, keepdims=True)
    second /= np.linalg.norm(second, axis=1, keepdims=True)
    scores = first @ second.T
    same = np.eye(len(clips), dtype=bool)
    return len(clips), scores.ravel(), same.ravel()


def report(name: str, speakers: int, scores: np.ndarray, same: np.ndarray, threshold: float) -> None:
    eer, at_eer = equal_error_rate(scores, same)
    far = float(np.mean(scores[~same] >= threshold))
    frr = float(np.mean(scores[same] < threshold))
    print(f"[{name}] speakers={speakers} target_trials={int(same.sum())} nontarget_trials={int((~same).sum())} "
          f"EER={eer:.3%} threshold_at_EER={at_eer:.3f} mean_same={scores[same].mean():.3f} "
          f"mean_diff={scores[~same].mean():.3f} min_same={scores[same].min():.3f} max_diff={scores[~same].max():.3f} "
          f"at_default_{threshold:.2f}: FAR={far:.3%} FRR={frr:.3%}")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--noise-pad", type=float, default=0.0, help="seconds of room noise around every clip")
    args = parser.parse_args()
    engine = Engine()
    for mode, embed in embedders(engine, args.noise_pad):
        clips, scores, same = trials(embed)
        report(f"utterances+sample, {mode}", len({c.speaker for c in clips}), scores, same, engine.default_threshold)
        report(f"librispeech halves, {mode}", *librispeech_trials(embed), engine.default_threshold)
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
