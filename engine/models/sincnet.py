"""Segmentation's SincNet with its first convolution computed once for overlapping chunks.

pyannote slides segmentation-3.0 over a recording in 10 s chunks every 2.5 s (step 0.25), so
every sample is in four chunks of a batch, and SincNet's first layer (80 sinc band-pass filters
of 251 taps, stride 10) filters it four times. That layer was a third of segmentation's CPU time.

It can be shared because what precedes it is linear per chunk: SincNet first normalises each
chunk's waveform (``InstanceNorm1d(1, affine=True)``: ``a * x + b`` with ``a`` and ``b`` from
the chunk's own mean and variance), and a convolution of ``a * x + b`` is
``a * conv(x) + b * sum(taps)``. So for a batch of consecutive chunks the filters run once over
the stretch the batch covers, and each chunk takes its slice of the result with its own ``a`` and
``b``; the rest of SincNet (abs, pooling, per-chunk instance norms, two small convolutions) runs
per chunk as before. The stride-10 convolution itself runs as a stride-1 convolution over the
waveform's 10 phases (a polyphase form), which oneDNN computes faster on the CPU.

Measured on the project's 2-core CPU, one thread, per chunk at batch 4: SincNet 28 -> 15 ms, the
whole segmentation model 51 -> 42 ms; 10 min of four-talker speech in lanes: segmentation
6.6 -> 5.1 s (docs/models.md). Outputs equal pyannote's to float32 rounding. A batch whose chunks
are not consecutive by the expected hop (the padded last chunk, a caller's own batch) runs
pyannote's forward unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


_GPU_PART = 32


def share_first_convolution(sincnet: torch.nn.Module, hop_samples: int) -> None:
    """Make ``sincnet(x)`` compute its first convolution once per batch of consecutive chunks.

    ``hop_samples`` is the distance between the starts of consecutive chunks.
    """
    original = sincnet.forward
    conv0 = sincnet.conv1d[0]
    stride = int(conv0.filterbank.stride)
    norm = sincnet.wav_norm1d
    if hop_samples <= 0 or hop_samples % stride or norm.track_running_stats or not norm.affine:
        return  # chunk starts off the filter's stride, or a normalisation that is not per chunk

    def forward(waveforms: torch.Tensor) -> torch.Tensor:
        batch, channels, samples = waveforms.shape
        if (
            batch < 2
            or channels != 1
            or samples <= hop_samples
            or not torch.equal(waveforms[1:, 0, : samples - hop_samples], waveforms[:-1, 0, hop_samples:])
        ):
            return original(waveforms)
        filters = conv0.filterbank.filters()  # (80, 1, taps), built from the learned band edges
        taps = filters.shape[-1]
        frames = (samples - taps) // stride + 1
        hop_frames = hop_samples // stride
        stretch = torch.cat([waveforms[0, 0], waveforms[1:, 0, samples - hop_samples :].reshape(-1)])
        raw = _strided_conv(stretch, filters, stride)  # (80, frames of the stretch)
        # InstanceNorm1d(1, affine=True) of each chunk as a * x + b; sums in float64 (a third of
        # torch.var_mean's time on one thread, and exact enough for 160k samples of audio)
        x = waveforms[:, 0]
        mean = x.sum(dim=-1, dtype=torch.float64) / samples
        var = ((x * x).sum(dim=-1, dtype=torch.float64) / samples - mean * mean).clamp_min(0.0)
        mean, var = mean.to(x.dtype), var.to(x.dtype)
        a = norm.weight / torch.sqrt(var + norm.eps)  # (batch,)
        b = norm.bias - a * mean
        gain = filters.sum(dim=-1)[:, 0]  # (80,) response of each filter to a constant
        views = raw.unfold(1, frames, hop_frames).transpose(0, 1)  # (batch, 80, frames), a view
        # the CPU takes the layers after it one chunk at a time, while its activations (80 x 16k
        # floats, 5 MB) are in cache; a GPU takes parts of 32 chunks (160 MB per intermediate,
        # where pyannote's forward held 1.3 GB for the first layer's output of a 256-chunk batch)
        per_chunk = 1 if waveforms.device.type == "cpu" else _GPU_PART
        outputs = []
        for first in range(0, batch, per_chunk):
            part = slice(first, first + per_chunk)
            out = torch.abs(views[part] * a[part, None, None] + b[part, None, None] * gain[None, :, None])
            out = F.leaky_relu(sincnet.norm1d[0](sincnet.pool1d[0](out)))
            for conv, pool, inorm in zip(sincnet.conv1d[1:], sincnet.pool1d[1:], sincnet.norm1d[1:]):
                out = F.leaky_relu(inorm(pool(conv(out))))
            outputs.append(out)
        return torch.cat(outputs)

    sincnet.forward = forward  # an instance attribute: nn.Module.__call__ looks it up first


def _strided_conv(signal: torch.Tensor, filters: torch.Tensor, stride: int) -> torch.Tensor:
    """``conv1d(signal, filters, stride=stride)`` for one channel, as a stride-1 convolution over
    the signal's ``stride`` phases: (samples,) -> (filters, frames)."""
    count, _, taps = filters.shape
    frames = (signal.numel() - taps) // stride + 1
    width = -(-taps // stride)  # taps per phase
    # filters as (count, phase, tap within phase); zero taps past the end
    weight = F.pad(filters[:, 0], (0, width * stride - taps)).reshape(count, width, stride).transpose(1, 2)
    length = (frames - 1 + width) * stride
    padded = F.pad(signal, (0, max(0, length - signal.numel())))[:length]
    phases = padded.reshape(-1, stride).T[None]  # (1, stride, samples / stride)
    return F.conv1d(phases, weight.contiguous())[0, :, :frames]
