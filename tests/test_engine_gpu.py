"""The engine on a CUDA device: skipped where there is none (this project's CI machines), run by
scripts/device_check.sh on a lent GPU machine.

What only a GPU can show: the recording reaches segmentation as a device tensor (one upload, no
host copy of every batch), the embeddings are computed there, and the answer is the CPU's.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


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


def test_a_device_side_assert_is_seen_as_a_failed_device():
    """What the worker's exit on a failed context (worker.tasks._exit_for_device) relies on: after a
    real device-side assert, ``Engine.device_works()`` says False. In a child process: the assert
    leaves that process's CUDA context unusable."""
    import subprocess
    import sys
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


def test_an_embedding_does_not_depend_on_the_jobs_before_it():
    """torch leaves cuDNN's TF32 on, and pyannote turns it off only inside its own pipeline
    calls: a fresh worker's /compare ran in TF32 and, after its first diarization, in float32.
    In a child process, as a fresh worker: the score before a diarization is the score after."""
    import subprocess
    import sys
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
