"""Segmentation's first convolution shared by overlapping chunks (engine/models/sincnet.py).

Real segmentation-3.0 weights on real speech: consecutive chunks give what pyannote's own forward
gives, through the shared path (the per-chunk first convolution is never called), and a batch that
is not consecutive chunks takes pyannote's path unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from engine.audio import load_audio
from evaluation.speech import pyannote_sample
from engine.models import bundled
from engine.models.sincnet import _strided_conv, share_first_convolution

RATE = 16000
WINDOW = 10 * RATE


@pytest.fixture(scope="module")
def models():
    from pyannote.audio import Model

    reference = Model.from_pretrained(bundled.segmentation_path()).eval()
    shared = copy.deepcopy(reference)
    share_first_convolution(shared.sincnet, WINDOW // 4)
    return reference, shared


@pytest.fixture(scope="module")
def speech() -> torch.Tensor:
    path, _ = pyannote_sample()
    return torch.from_numpy(load_audio(path).float32())


def _chunks(speech: torch.Tensor, hop: int, count: int) -> torch.Tensor:
    return speech.unfold(0, WINDOW, hop)[:count, None].contiguous()


def _first_conv_calls(model) -> list[int]:
    calls = []
    conv0 = model.sincnet.conv1d[0]
    forward = conv0.forward
    conv0.forward = lambda x: calls.append(x.shape[0]) or forward(x)
    return calls


def test_polyphase_convolution_is_the_strided_convolution():
    # seeded: the same draw every run (float32 rounding: 3.8e-5 here; 6.1e-5 at worst over
    # 10,000 unseeded draws, against atol 1e-4 plus rtol 1e-5 of values up to 70)
    generator = torch.Generator().manual_seed(0)
    signal, filters = torch.randn(12_345, generator=generator), torch.randn(80, 1, 251, generator=generator)
    expected = F.conv1d(signal[None, None], filters, stride=10)[0]
    assert torch.allclose(_strided_conv(signal, filters, 10), expected, atol=1e-4)


@pytest.mark.parametrize("count", [2, 5])
def test_consecutive_chunks_share_the_first_convolution_and_give_pyannotes_output(models, speech, count):
    reference, shared = models
    chunks = _chunks(speech, WINDOW // 4, count)
    calls = _first_conv_calls(shared)
    with torch.inference_mode():
        expected, got = reference(chunks), shared(chunks)
        features_expected, features_got = reference.sincnet(chunks), shared.sincnet(chunks)
    del shared.sincnet.conv1d[0].forward
    assert calls == []  # the filters ran once over the stretch, not through the per-chunk layer
    assert got.shape == expected.shape
    # float32 rounding: the convolution sums in another order, then instance norms rescale
    assert (features_got - features_expected).abs().max() < 1e-4 * features_expected.abs().max()
    assert (got - expected).abs().max() < 1e-3


def test_a_batch_that_is_not_consecutive_chunks_runs_pyannotes_forward(models, speech):
    reference, shared = models
    chunks = _chunks(speech, WINDOW // 4, 4)[[0, 2, 1, 3]]  # out of order
    other_hop = _chunks(speech, WINDOW // 2, 3)  # the hop it was not set up for
    calls = _first_conv_calls(shared)
    with torch.inference_mode():
        for batch in (chunks, other_hop, chunks[:1]):
            assert torch.equal(shared(batch), reference(batch))
    del shared.sincnet.conv1d[0].forward
    assert calls == [4, 3, 1]


def test_a_hop_off_the_filters_stride_is_left_to_pyannote(models):
    reference, _ = models
    model = copy.deepcopy(reference)
    share_first_convolution(model.sincnet, 40_005)
    assert "forward" not in vars(model.sincnet)
