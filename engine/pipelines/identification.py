"""Naming speakers after voiceprints: speech detection, per-speaker embeddings, optimal matching.

- **Speech.** Enrollment and ``identify`` embed only detected speech: pyannote's
  ``VoiceActivityDetection`` over the diarization pipeline's own segmentation model (the same
  segmentation-3.0 in both profiles), so "too little speech" means what diarization would hear.
- **Speaker vectors.** A diarized speaker is embedded again by the profile's embedder (the
  voiceprints' model) from its own non-overlapped speech (pyannote's exclusive diarization),
  longest turns first, up to ``identification_max_speech_s``. The clustering centroids are not
  used: in the production profile they come from another network (WeSpeaker ResNet34, 256-dim)
  than the voiceprints (ECAPA), and one code path for both profiles is worth the few tenths of a
  second per speaker this costs (bench/identification.py prints it).
- **Matching.** Cosine scores speakers x voiceprints; :func:`assign` gives each voiceprint to at
  most one speaker with the assignment that maximises the summed margin over the threshold
  (scipy's ``linear_sum_assignment``), so one strong match is never traded for two weak ones,
  and a greedy pass's order cannot steal a voiceprint from the speaker it fits best.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from engine.audio import SAMPLE_RATE, Audio

if TYPE_CHECKING:  # torch, which this module loads only when a detector runs
    from engine.lanes import Lanes

Regions = list[tuple[float, float]]


class SpeechDetector:
    """Speech regions of a recording, from a pyannote segmentation model."""

    def __init__(self, segmentation_model: Any, device: Any = None, step: float | None = None,
                 lanes: Lanes | None = None) -> None:
        from pyannote.audio.pipelines import VoiceActivityDetection

        # ``step``: the hop (seconds) of the model's window, the diarization's own where given.
        # pyannote's default, a tenth of the window, runs the model 2.5 times as often as the
        # embedded diarization's 2.5 s for the same regions (5 min of four talkers: 272.4 s of
        # speech against 271.3 s, 9.5 s against 3.8 s on two cores), and every /compare and
        # /embedding now asks it about each whole file
        kwargs = {} if step is None else {"step": step}
        self.pipeline = VoiceActivityDetection(segmentation=segmentation_model, **kwargs)
        self.pipeline.instantiate({"min_duration_on": 0.0, "min_duration_off": 0.0})
        if device is not None:
            self.pipeline.to(device)
        # a model that makes each batch float32 itself (the embedded profile's, see
        # engine.pipelines.embedded._float32_input) is given the recording as stored: a float32
        # copy of a 24 h recording is 5.5 GB of the worker's memory for one identify job
        self.compact = bool(getattr(segmentation_model, "casts_its_input", False))
        # the diarization's lanes (engine.lanes), whose batches the shared model splits once they
        # are open: outside them the LSTM ran on one two-thread team, 13.2 s for 15 min of speech
        # against 6.8 s in two lanes (the same regions), 0.23 s against 0.05 s for a 10 s clip
        self.lanes = lanes

    def __call__(self, audio: Audio) -> Regions:
        import contextlib
        import sys

        import torch

        from engine.pipelines import embedded

        # to the card once, as the diarization's: left on the host, each sample of every batch is
        # copied there four times
        file = embedded.uploaded_once(audio.as_pyannote(compact=self.compact), self.pipeline._segmentation.device)
        with torch.inference_mode(), contextlib.redirect_stdout(sys.stderr), (
            self.lanes.open() if self.lanes is not None else contextlib.nullcontext()
        ):
            annotation = self.pipeline(file)
        return [(float(s.start), float(s.end)) for s in annotation.get_timeline().support()]


def seconds(regions: Regions) -> float:
    return float(sum(max(0.0, e - s) for s, e in regions))


def cut(audio: Audio, regions: Regions, max_s: float | None = None) -> np.ndarray:
    """The samples of ``regions`` joined, longest regions first when ``max_s`` caps them (then
    put back in time order)."""
    chosen = sorted(regions, key=lambda r: r[0] - r[1])
    if max_s is not None:
        kept, total = [], 0.0
        for s, e in chosen:
            if total >= max_s:
                break
            e = min(e, s + (max_s - total))
            kept.append((s, e))
            total += e - s
        chosen = kept
    pieces = [audio.samples[int(s * SAMPLE_RATE): int(e * SAMPLE_RATE)] for s, e in sorted(chosen)]
    pieces = [p for p in pieces if len(p)]
    # as stored (float16 when decoded here): the embedders cast each block themselves, and a
    # float32 copy of a long recording's speech would double what the job holds
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=audio.samples.dtype)


def exclusive_regions(turns: Sequence[Any]) -> dict[str, Regions]:
    """Each speaker's turns less the time anyone else speaks too (for pipelines that give no
    exclusive diarization)."""
    from pyannote.core import Segment, Timeline

    by_speaker: dict[str, list] = {}
    for t in turns:
        if t.end > t.start:
            by_speaker.setdefault(t.speaker, []).append(Segment(t.start, t.end))
    out: dict[str, Regions] = {}
    for name, segments in by_speaker.items():
        own = Timeline(segments).support()
        others = Timeline([s for n, segs in by_speaker.items() if n != name for s in segs]).support()
        alone = own.extrude(others) if len(others) else own
        out[name] = [(float(s.start), float(s.end)) for s in alone]
    return out


def unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else vector.astype(np.float32)


# the decimals a score is reported with (confidence, runner_up.score, similarity_score)
SCORE_DECIMALS = 6


def score_matrix(vectors: np.ndarray, voiceprints: np.ndarray) -> np.ndarray:
    """Cosine similarities, (speakers, voiceprints), to the decimals they are reported with: a
    speaker is named by the score the result shows. Compared unrounded, a speaker scoring
    0.99999982 at threshold 1 was named nobody, and the result said ``confidence: 1.0`` beside
    ``threshold: 1.0``."""
    a = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    b = voiceprints / np.maximum(np.linalg.norm(voiceprints, axis=1, keepdims=True), 1e-12)
    return np.round(np.clip(a @ b.T, -1.0, 1.0).astype(np.float64), SCORE_DECIMALS)


def assign(scores: np.ndarray, threshold: float | np.ndarray) -> list[int | None]:
    """Per speaker (row), the voiceprint (column) it is named after, or None.

    Maximises the sum of ``score - threshold`` over the accepted pairs: a pair under the
    threshold is worth nothing (it is never accepted), each voiceprint goes to at most one
    speaker and each speaker gets at most one voiceprint. ``threshold``: one for every
    voiceprint, or one per voiceprint (column).
    """
    if scores.size == 0:
        return [None] * scores.shape[0]
    limit = np.broadcast_to(np.asarray(threshold, dtype=np.float64), scores.shape)
    gain = np.where(scores >= limit, scores - limit + 1e-9, 0.0)
    rows, cols = linear_sum_assignment(gain, maximize=True)
    out: list[int | None] = [None] * scores.shape[0]
    for r, c in zip(rows, cols):
        if scores[r, c] >= limit[r, c]:
            out[r] = int(c)
    return out


def describe(scores: np.ndarray, assigned: int | None, refs: Sequence[Any]) -> dict[str, Any]:
    """identity, voiceprint_id, confidence and runner-up of one speaker (or one recording)."""
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    main = assigned if assigned is not None else (order[0] if order else None)
    others = [i for i in order if i != main]
    runner = others[0] if others else None
    return {
        "identity": refs[assigned].label if assigned is not None else None,
        "voiceprint_id": refs[assigned].id if assigned is not None else None,
        "confidence": round(float(scores[main]), SCORE_DECIMALS) if main is not None else None,
        "runner_up": None if runner is None else {
            "voiceprint_id": refs[runner].id, "label": refs[runner].label,
            "score": round(float(scores[runner]), SCORE_DECIMALS),
        },
    }
