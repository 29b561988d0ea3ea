"""pyannote's frame-level steps at the end of diarization, without a Python loop per frame and
without the (chunks, frames, clusters) array of its reconstruction.

``SpeakerDiarization.reconstruct`` (each chunk's speakers merged per cluster, overlap-added, and
the speaker count of each frame turned into 0/1 per cluster) and ``Binarize`` (0/1 per speaker
turned into regions) walk the recording one frame at a time in Python, building a ``Segment`` for
each: about 200k frames an hour, twice each (the diarization and its exclusive form). That was
2 s of an hour on the CPU, where the networks take 45 s; on a GPU, where they take a few seconds,
it is a large share of the job. These give the same arrays and the same annotations
(tests/test_engine_discrete.py compares them with pyannote's on random and real input).
"""

from __future__ import annotations

import numpy as np
from pyannote.audio.pipelines import SpeakerDiarization
from pyannote.audio.pipelines.utils import SpeakerDiarizationMixin
from pyannote.audio.utils.signal import Binarize
from pyannote.core import Annotation, Segment, SlidingWindow, SlidingWindowFeature
from pyannote.core import segment as pyannote_segment
from pyannote.core.utils.generators import string_generator


def reconstruct(segmentations: SlidingWindowFeature, hard_clusters: np.ndarray,
                count: SlidingWindowFeature, weights: np.ndarray | None = None,
                alive: np.ndarray | None = None) -> SlidingWindowFeature:
    """``SpeakerDiarization.reconstruct`` without its (chunks, frames, clusters) float64 array.

    pyannote fills that array (each chunk's local speakers merged per cluster by their maximum,
    NaN for a cluster absent from the chunk) only to overlap-add it into (frames, clusters): 1.1 GB
    for 4 h of four speakers, 6.5 GB for the 24 h the service accepts. Here each chunk's merged
    speakers are added straight into the (frames, clusters) sums, in the same order and with the
    same float64 additions rounded to float32, so the sums are the same floats.

    ``weights`` (one per frame of a chunk, all positive) scales each chunk's say at each of its
    frames before the sums (``centre_weights``); None: every frame counts the same, as pyannote's.
    Only which clusters win a frame changes, never how many: ``count`` is the caller's.
    ``alive`` (a bool per cluster): a cluster that is not wins a frame only where too few of the
    others are heard to meet its count.
    """
    num_chunks, num_frames_per_chunk, _ = segmentations.data.shape
    num_clusters = int(np.max(hard_clusters)) + 1
    chunks = segmentations.sliding_window
    # Inference.aggregate's frames and length
    frames = SlidingWindow(start=chunks.start, duration=count.sliding_window.duration,
                           step=count.sliding_window.step)
    num_frames = frames.closest_frame(
        chunks.start + chunks.duration + (num_chunks - 1) * chunks.step + 0.5 * frames.duration) + 1
    sums = np.zeros((num_frames, num_clusters), dtype=np.float32)
    for c, (cluster, segmentation) in enumerate(zip(hard_clusters, segmentations.data)):
        start = frames.closest_frame(chunks[c].start + 0.5 * frames.duration)
        for k in np.unique(cluster):
            if k == -2:
                continue
            # a cluster absent from the chunk adds 0 to every frame (NaN masked out): skipped
            merged = np.max(segmentation[:, cluster == k], axis=1).astype(np.float64)
            if weights is not None:
                merged *= weights
            sums[start : start + num_frames_per_chunk, k] += merged
    # frames no chunk of a cluster covers are aggregate's ``missing`` (0.0): already 0
    if alive is not None:
        sums[:, ~np.asarray(alive, dtype=bool)[:num_clusters]] = -1.0  # below every sum of a live one
    return _top_count(SlidingWindowFeature(sums, frames), count)


def centre_weights(num_frames: int, sigma: float) -> np.ndarray:
    """A Gaussian over a chunk's frames, 1 at its middle, ``sigma`` a share of its half-length.

    Why the middle: the segmentation model tracks each local speaker within its 10 s chunk, and
    where two talkers take turns it can give both one local speaker there. That row's embedding
    is taken from the frames nearest the chunk's middle (``chunk_embeddings``), so the cluster it
    joins is the talker of the middle, and pyannote's reconstruction, in which each of the four
    chunks over a frame (step 0.25) has the same say, gave the other talker's turns near the
    chunk's edges to that cluster. Weighted, a frame goes by the chunk centred on it, whose
    embedding heard that very speech; the others only break its ties. Measured on the tuning
    sets (docs/models.md, "Reconstruction weighted to the chunk's middle").
    """
    half = (num_frames - 1) / 2
    x = (np.arange(num_frames) - half) / max(half, 1.0)
    # never 0 (e^-8 at the edges for sigma 0.25): a frame only one chunk covers (the recording's
    # first and last seconds) still ranks that chunk's clusters
    return np.maximum(np.exp(-0.5 * (x / sigma) ** 2), 1e-12)


def _top_count(activations: SlidingWindowFeature, count: SlidingWindowFeature) -> SlidingWindowFeature:
    """What ``SpeakerDiarizationMixin.to_diarization`` does with the aggregated activations: the
    ``count`` highest of each frame are 1."""
    _, num_speakers = activations.data.shape
    max_speakers_per_frame = np.max(count.data)
    if num_speakers < max_speakers_per_frame:
        activations.data = np.pad(activations.data, ((0, 0), (0, max_speakers_per_frame - num_speakers)))
    extent = activations.extent & count.extent
    activations = activations.crop(extent, return_data=False)
    count = count.crop(extent, return_data=False)

    # the same sort as pyannote's (argsort's default kind), so that ties go the same way
    sorted_speakers = np.argsort(-activations.data, axis=-1)
    binary = np.zeros_like(activations.data)
    # pyannote zips the count's frames with the activations' rows: the shorter one decides
    n = min(len(count.data), len(sorted_speakers))
    counts = count.data[:n].reshape(n, -1)[:, 0].astype(np.int64)
    # rank i of frame t is active when i < count[t]; each row of sorted_speakers is a permutation
    active = (np.arange(binary.shape[1])[None, :] < counts[:, None]).astype(binary.dtype)
    np.put_along_axis(binary[:n], sorted_speakers[:n], active, axis=1)
    return SlidingWindowFeature(binary, activations.sliding_window)


def binarize(scores: SlidingWindowFeature, onset: float = 0.5, offset: float = 0.5, min_duration_on: float = 0.0,
             min_duration_off: float = 0.0) -> Annotation:
    """``Binarize(onset, offset, min_duration_on, min_duration_off)(scores)`` (no padding).

    Each class is active from the frame where it rises above ``onset`` to the frame where it
    falls below ``offset``, both times taken at the frames' middles, a region still open at the
    end closing at the last frame's middle; a score between the two keeps the state it had.
    """
    num_frames, num_classes = scores.data.shape
    if onset < offset or num_frames < 2 or pyannote_segment.AUTO_ROUND_TIME:
        # onset below offset flips on every frame between them; one frame ends with an
        # unbound name in pyannote's loop; rounded segment times move the middles: pyannote's own
        return Binarize(onset=onset, offset=offset, min_duration_on=min_duration_on,
                        min_duration_off=min_duration_off)(scores)
    frames = scores.sliding_window
    # Segment(start + i * step, start + i * step + duration).middle, computed as pyannote does
    starts = frames.start + np.arange(num_frames) * frames.step
    timestamps = 0.5 * (starts + (starts + frames.duration))

    active = Annotation()
    track_generator = string_generator()
    for k, k_scores in enumerate(scores.data.T):
        label = k if scores.labels is None else scores.labels[k]
        track = next(track_generator)
        # 1 above onset, 0 below offset, -1 between: keeps the previous frame's state
        state = np.where(k_scores > onset, 1, np.where(k_scores < offset, 0, -1))
        state[0] = 1 if k_scores[0] > onset else 0
        known = np.where(state >= 0, np.arange(num_frames), 0)
        state = state[np.maximum.accumulate(known)]
        change = np.flatnonzero(np.diff(state)) + 1
        rises = change[state[change] == 1]
        falls = change[state[change] == 0]
        if state[0] == 1:
            rises = np.concatenate(([0], rises))
        if state[-1] == 1:
            falls = np.concatenate((falls, [num_frames - 1]))
        for a, b in zip(rises.tolist(), falls.tolist()):
            active[Segment(float(timestamps[a]), float(timestamps[b])), track] = label

    # as Binarize does after its loop
    if min_duration_off > 0.0:
        active = active.support(collar=min_duration_off)
    if min_duration_on > 0:
        for segment, track in list(active.itertracks()):
            if segment.duration < min_duration_on:
                del active[segment, track]
    return active


def to_annotation(discrete_diarization: SlidingWindowFeature, min_duration_on: float = 0.0,
                  min_duration_off: float = 0.0) -> Annotation:
    """``SpeakerDiarizationMixin.to_annotation``."""
    return binarize(discrete_diarization, onset=0.5, offset=0.5, min_duration_on=min_duration_on,
                    min_duration_off=min_duration_off)


# what they replace, for the tests that compare the two
PYANNOTE = {"to_diarization": SpeakerDiarizationMixin.to_diarization,
            "to_annotation": SpeakerDiarizationMixin.to_annotation,
            "reconstruct": SpeakerDiarization.reconstruct}
