"""The engine on a CUDA device: skipped where there is none (this project's CI machines), run by
scripts/device_check.sh on a lent GPU machine.

What only a GPU can show: the recording reaches segmentation as a device tensor (one upload, no
host copy of every batch), the embeddings are computed there, and the answer is the CPU's.

The last tests run everywhere: they check the device check itself (its budget, its bench's
handling of a child that died), which has one run on a lent card and no second try.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def conversation():
    from evaluation.longform import long_conversation

    return long_conversation(3)


def _batch_devices(monkeypatch) -> list[torch.device]:
    """The device of every segmentation batch pyannote's inference receives from here on."""
    from pyannote.audio.core.inference import Inference

    seen: list[torch.device] = []
    infer = Inference.infer

    def recording(self, chunks):
        seen.append(chunks.device)
        return infer(self, chunks)

    monkeypatch.setattr(Inference, "infer", recording)
    return seen


def _engine(device: str):
    from engine.core import Engine
    from shared.settings import Settings

    return Engine(Settings(device=device)).load_models()


@needs_cuda
def test_segmentation_batches_are_on_the_device_and_the_answer_is_the_cpus(conversation, monkeypatch):
    from engine.audio import Audio
    from evaluation.speech import diarization_error_rate

    samples, reference = conversation
    seen = _batch_devices(monkeypatch)
    gpu = _engine("cuda").diarize(Audio(samples))
    assert gpu.model_device.startswith("cuda")
    assert seen and all(d.type == "cuda" for d in seen)

    cpu = _engine("cpu").diarize(Audio(samples))
    der = {name: diarization_error_rate(reference, r.diarization_results) for name, r in (("gpu", gpu), ("cpu", cpu))}
    speakers = {name: len({t.speaker for t in r.diarization_results}) for name, r in (("gpu", gpu), ("cpu", cpu))}
    assert speakers["gpu"] == speakers["cpu"]
    assert abs(der["gpu"] - der["cpu"]) < 0.01, der


@needs_cuda
def test_a_device_side_assert_is_seen_as_a_failed_device():
    """What the worker's exit on a failed context (worker.tasks._exit_for_device) relies on: after a
    real device-side assert, ``Engine.device_works()`` says False. In a child process: the assert
    leaves that process's CUDA context unusable."""
    import textwrap

    code = textwrap.dedent("""
        import torch
        from engine.core import Engine
        engine = Engine(device="cuda")
        assert engine.device_works()
        try:
            torch.arange(3, device="cuda")[torch.tensor([7], device="cuda")].item()
        except Exception as exc:
            print("raised:", type(exc).__name__)
        print("works after:", engine.device_works())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "works after: False" in out.stdout, out.stdout + out.stderr[-2000:]


@needs_cuda
def test_a_recording_over_the_cap_stays_on_the_host(conversation, monkeypatch):
    """GPU memory stays bounded whatever the length: past DEVICE_AUDIO_MAX_BYTES (here lowered to
    1 MB) the samples go batch by batch, and the answer is the same."""
    from engine.audio import Audio
    from engine.pipelines import embedded

    samples, _ = conversation
    engine = _engine("cuda")
    whole = engine.diarize(Audio(samples))
    seen = _batch_devices(monkeypatch)
    monkeypatch.setattr(embedded, "DEVICE_AUDIO_MAX_BYTES", 2**20)
    batched = engine.diarize(Audio(samples))
    assert seen and all(d.type == "cpu" for d in seen)
    assert batched.diarization_results == whole.diarization_results


@needs_cuda
def test_an_embedding_does_not_depend_on_the_jobs_before_it():
    """torch leaves cuDNN's TF32 on, and pyannote turns it off only inside its own pipeline
    calls: a fresh worker's /compare ran in TF32 and, after its first diarization, in float32.
    In a child process, as a fresh worker: the score before a diarization is the score after."""
    import textwrap

    code = textwrap.dedent("""
        import numpy as np, torch
        from engine.audio import Audio
        from engine.core import Engine
        from evaluation.longform import long_conversation
        samples, _ = long_conversation(3)
        engine = Engine(device="cuda").load_models()
        print("flags", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        a, b = Audio(samples[: 16000 * 20]), Audio(samples[16000 * 60 : 16000 * 80])
        before = engine.compare(a, b).similarity_score
        engine.diarize(Audio(samples[: 16000 * 60]))
        after = engine.compare(a, b).similarity_score
        print("same", before == after, before, after)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "flags False False" in out.stdout and "same True" in out.stdout, out.stdout + out.stderr[-2000:]


def test_the_device_check_keeps_to_its_budget(tmp_path):
    """A session has one run of at most 10 minutes on a lent card. The steps' own limits add up to
    far more; past its budget the script skips what is left, saying so, and ends with its log
    whole, instead of being cut off mid-step by the device tool with the later targets unmeasured.
    A CPU rehearsal with a budget of 1 s: every step is skipped, at once."""
    env = {**os.environ, "OUT": str(tmp_path), "DEVICE_CHECK_PYTHON": sys.executable,
           "DEVICE_CHECK_DEVICE": "cpu", "DEVICE_CHECK_BUDGET_S": "1", "DEVICE_CHECK_STEPS": ""}
    started = time.monotonic()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    log = (tmp_path / "device-check.log").read_text()
    assert time.monotonic() - started < 30, log
    steps = [line for line in log.splitlines() if line.startswith("=== ") and "machine" not in line]
    assert len(steps) >= 9 and steps[-1].startswith("=== done"), log
    assert log.count("skipped: ") == len(steps), log  # the eight steps and the models' load
    # the release targets come first: the hour (1), the 4 h file's GPU memory (3), the tests (0)
    assert [s.split()[1] for s in steps[:4]] == ["1.", "3.", "0.", "5."], steps
    assert done.returncode == 0, done.stderr


def test_the_bench_says_at_once_that_a_child_died():
    """bench/diarization_vs_senko.py runs each engine in a child and waited on its queue for up to
    3 h: a child that died (senko's GPU run without its rebuilt models, an out-of-memory error)
    held the device check's step until its limit. Now the death is an error within seconds."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import diarization_vs_senko as bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    started = time.monotonic()
    with pytest.raises(bench.ChildFailed, match="exit code 1"):
        bench.in_child(int, "not a number")  # int("not a number", queue) raises in the child
    assert time.monotonic() - started < 20


def test_cudnn_keeps_a_bounded_number_of_plans():
    """cuDNN's plan cache holds up to 10,000 execution plans by default (about 2 GiB of host memory
    by torch's documentation), one per convolution and input shape, and CAM++'s 225 convolutions
    see a new batch shape nearly every call on a GPU: a GPU worker grew by plans no later job used.
    engine.runtime bounds it before torch could read it (at the first cuDNN convolution), unless
    the operator chose a limit. Checked in this process, as the worker's: engine.runtime is
    imported before any model runs."""
    import engine.runtime  # noqa: F401

    limit = os.environ.get("TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT")
    assert limit is not None and 0 < int(limit) <= 2000


def test_a_cam_batch_out_of_gpu_memory_is_embedded_in_halves(caplog):
    """CAM++'s batches on a GPU hold up to 50k frames (about 2 GB at the peak) whatever memory the
    worker's share (gpu_memory_fraction) or a neighbour on the card leaves: out of memory, every
    long diarization failed, on every attempt. The batch is now embedded in halves, each row cut as
    before, so the answer is the same. No GPU here, which is a stand-in: CAM++ is replaced by a
    per-row function that raises torch's out-of-memory error for more than 3 rows at once."""
    import logging

    import numpy as np

    from engine.models.campplus import CAMPPlusEmbedding
    from engine.pipelines.chunk_embeddings import EmbeddingBudget, chunk_embeddings

    model = CAMPPlusEmbedding()
    projection = torch.randn(80, model.dimension, generator=torch.Generator().manual_seed(0))
    calls: list[int] = []

    def per_row(feats: torch.Tensor) -> torch.Tensor:  # each row's answer depends on that row alone
        return feats.mean(dim=1) @ projection + feats.shape[1]

    def short_of_memory(feats: torch.Tensor) -> torch.Tensor:
        calls.append(feats.shape[0])
        if feats.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return per_row(feats)

    rng = np.random.default_rng(1)
    binary = np.zeros((8, 589, 3), dtype=np.float32)
    for c in range(8):
        for s in range(3):
            start = int(rng.integers(0, 300))
            binary[c, start : start + int(rng.integers(60, 289)), s] = 1.0
    waveform = torch.from_numpy(rng.standard_normal(int((7 * 2.5 + 10) * 16000)).astype(np.float32) * 0.1)
    budget = EmbeddingBudget(batch_frames=50_000, group_chunks=8)

    def embed(fn) -> np.ndarray:
        model.embed_batch = fn  # an instance attribute, as the pipeline's wrappers are
        return chunk_embeddings(model, waveform, binary, 0.0, 2.5, 10.0, budget=budget)

    expected = embed(per_row)
    with caplog.at_level(logging.WARNING, logger="engine.pipelines.chunk_embeddings"):
        halved = embed(short_of_memory)
    assert calls[0] > 3  # the first batch did not fit, its halves did
    assert "ran out of GPU memory" in caplog.text
    # float32 products of another batch size (BLAS blocks them by shape): equal to 1e-4, not 1e-5
    np.testing.assert_allclose(halved, expected, rtol=1e-4, atol=1e-4)
    assert np.isfinite(expected).any()

    def never(feats: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # one row that does not fit is the job's error
        embed(never)
