"""The frame-level steps without a loop per frame (engine/pipelines/discrete.py) give what
pyannote's own give: on random input built to hit the edge cases (ties, counts above the number
of speakers, local speakers left out or sharing a cluster, scores exactly at the threshold,
hysteresis, short gaps and regions), and on the real pipeline run over real speech with real
weights, where every call is checked."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from pyannote.audio.utils.signal import Binarize
from pyannote.core import SlidingWindow, SlidingWindowFeature

from engine.pipelines import discrete
from engine.pipelines.embedded import EmbeddedSpeakerDiarization

# segmentation-3.0's frames and a 10 s window every 2.5 s, as the pipeline has them
FRAMES = SlidingWindow(start=0.0, duration=0.0619375, step=0.016875)


def _tracks(annotation) -> list:
    return [(s.start, s.end, t, label) for s, t, label in annotation.itertracks(yield_label=True)]


def _segmentations(rng, chunks: int, speakers: int, binary: bool) -> SlidingWindowFeature:
    data = rng.random((chunks, 589, speakers))
    if binary:
        data = (data > 0.6).astype(np.float32)
    return SlidingWindowFeature(data, SlidingWindow(start=0.0, duration=10.0, step=2.5))


def _pyannote_reconstruct(segmentations, hard_clusters, count):
    # SpeakerDiarization.reconstruct, with pyannote's own to_diarization behind it
    owner = SimpleNamespace(to_diarization=discrete.PYANNOTE["to_diarization"])
    return discrete.PYANNOTE["reconstruct"](owner, segmentations, hard_clusters, count)


@pytest.mark.parametrize("seed", range(6))
def test_reconstruct_is_pyannotes(seed):
    rng = np.random.default_rng(10 + seed)
    chunks, speakers = int(rng.integers(1, 60)), 3
    segmentations = _segmentations(rng, chunks, speakers, binary=seed != 5)  # and one not 0/1
    clusters = int(rng.integers(1, 6))
    # -2: a local speaker inactive in its chunk, left out; several local speakers may share a cluster
    hard_clusters = rng.integers(-2, clusters, size=(chunks, speakers))
    hard_clusters[hard_clusters == -1] = 0
    hard_clusters[0, 0] = clusters - 1
    frames = int((segmentations.sliding_window[chunks - 1].end) / FRAMES.step) + 1
    # counts up to one above the clusters: pyannote pads the activations for them
    count = SlidingWindowFeature(rng.integers(0, clusters + 2, size=(frames, 1)).astype(np.uint8), FRAMES)

    ours = discrete.reconstruct(segmentations, hard_clusters, count)
    theirs = _pyannote_reconstruct(segmentations, hard_clusters, count)
    window = lambda w: (w.start, w.duration, w.step)  # noqa: E731
    assert window(ours.sliding_window) == window(theirs.sliding_window)
    assert ours.data.dtype == theirs.data.dtype
    np.testing.assert_array_equal(ours.data, theirs.data)
    assert ours.data.sum() > 0


@pytest.mark.parametrize(("onset", "offset", "on", "off"), [
    (0.5, 0.5, 0.0, 0.0),   # the pipeline's to_annotation
    (0.5, 0.5, 0.0, 0.1),   # short gaps filled
    (0.5, 0.5, 0.2, 0.0),   # short regions dropped
    (0.7, 0.3, 0.0, 0.0),   # hysteresis: a score between the two keeps the state
    (0.6, 0.6, 0.1, 0.05),
])
@pytest.mark.parametrize("seed", range(4))
def test_binarize_is_pyannotes(seed, onset, offset, on, off):
    rng = np.random.default_rng(seed)
    frames = int(rng.integers(2, 3000))
    # runs of random length, so that regions are long enough to meet the duration limits
    runs = np.repeat(rng.random((frames // 5 + 1, 3)), 5, axis=0)[:frames]
    # some scores exactly at a threshold, and a binary class (the discrete diarization's case)
    runs[rng.random(runs.shape) < 0.05] = onset
    runs[rng.random(runs.shape) < 0.05] = offset
    runs[:, 2] = runs[:, 2] > 0.5
    scores = SlidingWindowFeature(runs, FRAMES)

    ours = discrete.binarize(scores, onset=onset, offset=offset, min_duration_on=on, min_duration_off=off)
    theirs = Binarize(onset=onset, offset=offset, min_duration_on=on, min_duration_off=off)(scores)
    assert _tracks(ours) == _tracks(theirs)
    assert len(_tracks(ours)) > 0


def test_a_class_active_throughout_and_one_never():
    data = np.zeros((50, 2))
    data[:, 0] = 1.0
    scores = SlidingWindowFeature(data, FRAMES)
    assert _tracks(discrete.to_annotation(scores)) == _tracks(discrete.PYANNOTE["to_annotation"](scores))
    assert [label for *_, label in _tracks(discrete.to_annotation(scores))] == [0]


def test_centre_weights_give_a_frame_to_the_chunk_centred_on_it():
    """Three chunks over one frame: the two that see it near their edges put their local speaker
    in cluster 0, the one centred on it in cluster 1. pyannote's equal weights give the frame to
    cluster 0 (two votes to one); weighted to the chunks' middles, to cluster 1."""
    window = SlidingWindow(start=0.0, duration=10.0, step=2.5)
    segmentations = SlidingWindowFeature(np.ones((3, 589, 1), dtype=np.float32), window)
    hard_clusters = np.array([[0], [1], [0]])
    frames = int(window[2].end / FRAMES.step) + 1
    count = SlidingWindowFeature(np.ones((frames, 1), dtype=np.uint8), FRAMES)
    # the middle of chunk 1 (7.5 s): 2.5 s from chunk 0's end and from chunk 2's start
    frame = FRAMES.closest_frame(7.5)

    equal = discrete.reconstruct(segmentations, hard_clusters, count)
    assert equal.data[frame].tolist() == [1.0, 0.0]
    weights = discrete.centre_weights(589, 0.25)
    weighted = discrete.reconstruct(segmentations, hard_clusters, count, weights=weights)
    assert weighted.data[frame].tolist() == [0.0, 1.0]
    # the first frames, which only chunk 0 sees (at its weakest), are still its cluster's
    assert weighted.data[0].tolist() == [1.0, 0.0]
    assert weights.min() > 0 and weights.argmax() in (294, 295) and weights.max() == pytest.approx(1.0, abs=1e-4)
    # the count is the caller's: as many speakers a frame as before, only which ones changed
    np.testing.assert_array_equal(weighted.data.sum(axis=1), equal.data.sum(axis=1))


@pytest.fixture(scope="module")
def engine():
    from engine.core import Engine
    from shared.settings import Settings

    # pyannote's equal weights, which these tests compare with (the default weights the chunks'
    # middles: the test above, and tests/test_engine_batched.py on real speech)
    return Engine(Settings(device="cpu", diarization_centre_sigma=None)).load_models()


def test_the_pipeline_on_real_speech_gets_pyannotes_conversions(engine, monkeypatch):
    """Every call the pipeline makes, on three minutes of four real talkers, is answered the same."""
    from engine.audio import Audio
    from evaluation.longform import long_conversation

    calls = {"reconstruct": 0, "to_annotation": 0}
    ours = {name: getattr(discrete, name) for name in calls}

    def reconstruct(*args, weights=None):
        calls["reconstruct"] += 1
        assert weights is None
        mine, theirs = ours["reconstruct"](*args), _pyannote_reconstruct(*args)
        np.testing.assert_array_equal(mine.data, theirs.data)
        return mine

    def to_annotation(*args, **kwargs):
        calls["to_annotation"] += 1
        mine, theirs = ours["to_annotation"](*args, **kwargs), discrete.PYANNOTE["to_annotation"](*args, **kwargs)
        assert _tracks(mine) == _tracks(theirs)
        return mine

    monkeypatch.setattr(discrete, "reconstruct", reconstruct)
    monkeypatch.setattr(EmbeddedSpeakerDiarization, "to_annotation", staticmethod(to_annotation))
    samples, _ = long_conversation(3)
    result = engine.diarize(Audio(samples))
    # the diarization and its exclusive form
    assert calls == {"reconstruct": 2, "to_annotation": 2}
    assert len({t.speaker for t in result.diarization_results}) >= 2


def test_the_pipeline_uses_them():
    assert EmbeddedSpeakerDiarization.to_annotation is discrete.to_annotation
