"""The engine's GPU code paths, run on a CUDA device simulated on the CPU (tests/_simulated_cuda.py).

No GPU here, which is what the simulation stands in for: this project's CI machines have none,
and without it the code that runs only when ``device.type == "cuda"`` (the recording uploaded to
the card once, segmentation batches of 256, CAM++ batches of 50k frames kept on the card until
their group is done, pinned index copies, ``torch.cuda`` calls) would first run on a user's card.
The simulation enforces CUDA's device rules (a host tensor next to a device tensor fails, so does
``.numpy()`` of a device tensor); the first test shows that it does. What it cannot show (speed,
memory, cuDNN's numerics) is tests/test_engine_gpu.py's, on a lent card.

The answer must be the CPU's for the same batches: a GPU's batches differ from a CPU's (each CAM++
batch is cut to its shortest row), so the CPU engine it is compared with is given the GPU's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests._simulated_cuda import on_device, simulated_cuda

# where a real card is present, tests/test_engine_gpu.py runs on it instead
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a real CUDA device is present")


@pytest.fixture(scope="module")
def conversation():
    from evaluation.longform import long_conversation

    samples, _ = long_conversation(2)
    return samples[: 16000 * 30]


@pytest.fixture(scope="module")
def threads():
    # both engines on one thread: the comparison is to the bit, so the summation order is fixed
    saved = torch.get_num_threads()
    yield 1
    torch.set_num_threads(saved)


def _recording_devices(patch: pytest.MonkeyPatch) -> tuple[list[bool], list[bool]]:
    """Whether each segmentation batch and each CAM++ batch from here on is on the card."""
    from pyannote.audio.core.inference import Inference

    from engine.models.campplus import CAMPPlusEmbedding

    segmented: list[bool] = []
    embedded: list[bool] = []
    infer, embed_batch = Inference.infer, CAMPPlusEmbedding.embed_batch

    def recording_infer(self, chunks):
        segmented.append(on_device(chunks))
        return infer(self, chunks)

    def recording_embed(self, feats):
        embedded.append(on_device(feats))
        return embed_batch(self, feats)

    patch.setattr(Inference, "infer", recording_infer)
    patch.setattr(CAMPPlusEmbedding, "embed_batch", recording_embed)
    return segmented, embedded


@pytest.fixture(scope="module")
def cpu_engine(threads):
    """The CPU engine with a GPU's batch sizes (engine.pipelines.embedded.budget_for), and what
    its models ran while they loaded."""
    from engine.core import Engine
    from engine.pipelines import embedded
    from shared.settings import Settings

    budget = embedded.budget_for(torch.device("cuda", 0))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(embedded, "budget_for", lambda device: budget)
        loading = _recording_devices(patch)
        engine = Engine(Settings(device="cpu", torch_threads=threads, segmentation_batch_size=256)).load_models()
    return engine, loading


@pytest.fixture(scope="module")
def gpu_engine(threads):
    """The engine on the simulated card, and what its models ran while they loaded."""
    from engine.core import Engine
    from engine.models import campplus
    from shared.settings import Settings

    with simulated_cuda(), pytest.MonkeyPatch.context() as patch:
        loading = _recording_devices(patch)
        engine = Engine(Settings(device="cuda", torch_threads=threads)).load_models()
        assert engine.model_device == "cuda:0"
    yield engine, loading
    campplus._SHARED.pop("cuda:0", None)  # the simulated card's network is no other test's


def _turns(result) -> list[tuple[float, float, str]]:
    return [(t.start, t.end, t.speaker) for t in result.diarization_results]


def test_the_simulation_fails_where_a_card_would():
    """CUDA's rules hold in the simulation, or the tests below could not fail."""
    with simulated_cuda():
        device = torch.ones(4, device="cuda:0")
        assert on_device(device) and device.device == torch.device("cuda", 0)
        assert on_device(device * 2) and not on_device(device.cpu())
        with pytest.raises(RuntimeError, match="same device"):
            device + torch.ones(4)
        with pytest.raises(TypeError, match="cuda:0 device type tensor to numpy"):
            device.numpy()
        with pytest.raises(TypeError):
            np.asarray(device)
        layer = torch.nn.Linear(4, 2).to(torch.device("cuda", 0))
        assert on_device(layer.weight) and on_device(layer(device))
        with pytest.raises(RuntimeError, match="same device"):
            layer(torch.ones(4))
        assert float((device + torch.tensor(1.0)).sum()) == 8.0  # a host scalar is allowed, as on a card
        assert device[torch.tensor([0, 2])].device.type == "cuda"  # so is indexing with host indices


def test_a_gpu_engine_warms_its_models_up_when_it_loads(cpu_engine, gpu_engine):
    """A fresh GPU worker's first job would pay for what CUDA sets up on first use; load_models
    runs pyannote's sample through every model on the card first. A CPU engine does not."""
    segmented, embedded = gpu_engine[1]
    assert segmented and all(segmented) and embedded and all(embedded)
    assert cpu_engine[1] == ([], [])


def test_a_diarization_on_the_card_is_the_cpus(conversation, cpu_engine, gpu_engine, monkeypatch):
    from engine.audio import Audio

    (cpu_engine, _), (gpu_engine, _) = cpu_engine, gpu_engine
    segmented, embedded = _recording_devices(monkeypatch)
    for kwargs in ({}, {"num_speakers": 5}):
        reported: list[tuple[str, float]] = []
        with simulated_cuda():
            gpu = gpu_engine.diarize(Audio(conversation), progress=lambda step, done: reported.append((step, done)),
                                     **kwargs)
        assert gpu.model_device == "cuda:0"
        # a batch of 256 chunks holds the whole recording: pyannote counted it as 256 chunks done
        # of 9, and the job said 100 % before its embeddings, which then went unreported
        fractions = [done for _, done in reported]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0, reported
        assert max(done for step, done in reported if step == "segmentation") < 0.5, reported
        assert any(step == "embeddings" and done < 1.0 for step, done in reported), reported
        assert segmented and all(segmented) and embedded and all(embedded), kwargs
        segmented.clear(), embedded.clear()
        cpu = cpu_engine.diarize(Audio(conversation), **kwargs)
        assert not any(segmented) and not any(embedded)
        segmented.clear(), embedded.clear()
        assert _turns(gpu) == _turns(cpu), kwargs
        if "num_speakers" in kwargs:
            assert len({t.speaker for t in gpu.diarization_results}) == 5


def test_a_quiet_recording_and_one_over_the_upload_cap_on_the_card(conversation, cpu_engine, gpu_engine, monkeypatch):
    """The quiet-recording gain is measured on the card's copy; past DEVICE_AUDIO_MAX_BYTES the
    recording stays on the host and goes batch by batch: the same answer either way."""
    from engine.audio import Audio
    from engine.pipelines import embedded

    (cpu_engine, _), (gpu_engine, _) = cpu_engine, gpu_engine
    quiet = (conversation * 0.003).astype(np.float32)
    expected = _turns(cpu_engine.diarize(Audio(quiet)))
    with simulated_cuda():
        assert _turns(gpu_engine.diarize(Audio(quiet))) == expected
        monkeypatch.setattr(embedded, "DEVICE_AUDIO_MAX_BYTES", 2**16)
        assert _turns(gpu_engine.diarize(Audio(quiet))) == expected


def test_verification_and_voiceprints_on_the_card_are_the_cpus(conversation, cpu_engine, gpu_engine):
    from engine.audio import Audio

    (cpu_engine, _), (gpu_engine, _) = cpu_engine, gpu_engine
    a, b = Audio(conversation[: 16000 * 12]), Audio(conversation[16000 * 16 :])
    cpu_score = cpu_engine.compare(a, b).similarity_score
    cpu_vector = np.asarray(cpu_engine.embed(a).embedding)
    voiceprint = cpu_engine.enroll([a], label="first")
    ref = {"id": "1", "label": "first", "model": voiceprint.model, "embedding": voiceprint.embedding}
    cpu_named = cpu_engine.identify(b, [ref])
    with simulated_cuda():
        compared = gpu_engine.compare(a, b)
        vector = np.asarray(gpu_engine.embed(a).embedding)
        enrolled = gpu_engine.enroll([a], label="first")
        named = gpu_engine.identify(b, [ref])
    assert compared.model_device == "cuda:0"
    assert compared.similarity_score == pytest.approx(cpu_score, abs=1e-5)
    np.testing.assert_allclose(vector, cpu_vector, atol=1e-5)
    np.testing.assert_allclose(enrolled.embedding, voiceprint.embedding, atol=1e-5)
    assert enrolled.speech_seconds == voiceprint.speech_seconds
    assert (named.identity, named.speech_seconds) == (cpu_named.identity, cpu_named.speech_seconds)
    assert named.confidence == pytest.approx(cpu_named.confidence, abs=1e-5)
