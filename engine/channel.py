"""What a recording went through before it reached us, as far as the clustering needs to know.

A telephone line (G.711 and the narrowband mobile codecs: 300-3400 Hz) makes different talkers'
CAM++ embeddings alike: at the clustering threshold tuned on microphone speech, four to eight
talkers on a line came out as one or two (docs/models.md, "Recording conditions"). The band alone
is not the cause (an 8 kHz recording with its low end intact clusters as well as a wideband one),
so the test is the line's own signature: almost nothing below 250 Hz and nothing above 3.7 kHz.
"""

from __future__ import annotations

import numpy as np

from engine.audio import SAMPLE_RATE

# share of the speech's spectral energy above 80 Hz that lies in 80-250 Hz (a voice's
# fundamental and first harmonics): 0.08-0.62 in microphone speech measured here, pyannote's
# narrowband sample 0.077; under 0.031 through a simulated line (300 Hz high-pass)
LOW_BAND_SHARE = 0.04
# ... and above 3.7 kHz: 0.0015-0.08 wideband, 0.0001-0.007 at 8 kHz, 1e-5 through a line
HIGH_BAND_SHARE = 0.0005
_FFT = 512
_PIECE_S = 0.5
_PIECES = 240  # at most 2 minutes of the recording are looked at, evenly spread


def band_shares(samples: np.ndarray, rate: int = SAMPLE_RATE) -> tuple[float, float]:
    """(low, high): shares of the louder half of the recording's frames' energy above 80 Hz that
    lie in 80-250 Hz and above 3.7 kHz. Reads at most two minutes, evenly spread."""
    piece = int(_PIECE_S * rate)
    if len(samples) < _FFT:
        return 1.0, 1.0
    starts = np.unique(np.linspace(0, max(0, len(samples) - piece), _PIECES).astype(np.int64))
    window = np.hanning(_FFT).astype(np.float32)
    power = []
    for start in starts:
        chunk = np.asarray(samples[start : start + piece], dtype=np.float32)
        if len(chunk) < _FFT:
            continue
        frames = np.lib.stride_tricks.sliding_window_view(chunk, _FFT)[:: _FFT // 2]
        power.append(np.abs(np.fft.rfft(frames * window, axis=1)) ** 2)
    spec = np.concatenate(power)
    energy = spec.sum(axis=1)
    loud = spec[energy >= np.median(energy)].sum(axis=0)
    freqs = np.fft.rfftfreq(_FFT, 1 / rate)
    total = loud[freqs >= 80].sum()
    if total <= 0:
        return 1.0, 1.0
    return float(loud[(freqs >= 80) & (freqs < 250)].sum() / total), float(loud[freqs > 3700].sum() / total)


def through_a_telephone_line(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bool:
    low, high = band_shares(samples, rate)
    return low < LOW_BAND_SHARE and high < HIGH_BAND_SHARE


# --- one talker a channel (stereo calls) --------------------------------------------------------
# A call centre's recorder often writes the agent on one channel and the customer on the other.
# Such a file is diarized by its channels (Engine.diarize): each channel's speech is its talker's,
# which no clustering of the mixed voices gets as right, least of all through a telephone line.
_FRAME_S = 0.02
# a frame belongs to one channel when it is this much louder there than on the other: a talker
# on their own line against the other line's noise, echo or crosstalk (20-40 dB down)
DOMINANT_DB = 15.0
# ... and the channels are separated when most of the speech frames belong to one channel
# (overlapped speech is the rest) and each channel holds at least a share of them: a voice
# panned to both (dual mono, a microphone pair in one room) differs by a few dB, and a one-sided
# recording (one channel silent) has every frame on one side
SEPARATED_SHARE = 0.6
EACH_SHARE = 0.05
# a channel's speech is kept where its frames are no more than CROSSTALK_DB below the other
# channel: its own talker (or both talking at once), not the other's voice leaking across as
# line echo, which echo cancellers leave 20 dB and more down. Gaps of the kept frames under
# _BRIDGE_S within a region are bridged; pieces under _PIECE_MIN_S are dropped
CROSSTALK_DB = 10.0
_BRIDGE_S = 0.3
_PIECE_MIN_S = 0.1
_SMOOTH_FRAMES = 10


def frame_levels(samples: np.ndarray, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mean power of each 20 ms frame (float64), computed a block at a time."""
    hop = int(_FRAME_S * rate)
    n = len(samples) // hop
    out = np.empty(n, dtype=np.float64)
    step = 50_000  # frames a block (about 16 s of float64 work a time)
    for first in range(0, n, step):
        last = min(n, first + step)
        block = np.asarray(samples[first * hop : last * hop], dtype=np.float32).reshape(-1, hop)
        out[first:last] = np.einsum("ij,ij->i", block, block, dtype=np.float64) / hop
    return out


def separated(left: np.ndarray, right: np.ndarray, rate: int = SAMPLE_RATE) -> bool:
    """Whether two channels each carry a talker of their own (a stereo call recording)."""
    a, b = frame_levels(left, rate), frame_levels(right, rate)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    loudest = np.maximum(a, b)
    if n == 0 or not (loudest > 0).any():
        return False
    # speech frames: within 30 dB of the recording's loud level
    loud = loudest > np.percentile(loudest, 95) * 10 ** (-30 / 10)
    if loud.sum() < 1.0 / _FRAME_S:  # under a second of sound
        return False
    diff = 10 * np.log10((a[loud] + 1e-12) / (b[loud] + 1e-12))
    on_left, on_right = float((diff >= DOMINANT_DB).mean()), float((diff <= -DOMINANT_DB).mean())
    return on_left + on_right >= SEPARATED_SHARE and min(on_left, on_right) >= EACH_SHARE


def own_speech(regions: list[tuple[float, float]], mine: np.ndarray, other: np.ndarray,
               rate: int = SAMPLE_RATE) -> list[tuple[float, float]]:
    """The parts of one channel's speech regions that are its own talker: frames at most
    CROSSTALK_DB quieter than the other channel (frame by frame: a region the detector found often
    runs from the talker's own words into the other talker's echo)."""
    a, b = frame_levels(mine, rate), frame_levels(other, rate)
    n = min(len(a), len(b))
    # levels over 0.2 s: a word's own quiet frames (a stop, a pause) are not the other's echo,
    # and an echo's odd frame above the line (its onsets) is not a word
    window = np.ones(_SMOOTH_FRAMES) / _SMOOTH_FRAMES
    a, b = np.convolve(a[:n], window, mode="same"), np.convolve(b[:n], window, mode="same")
    ours = a * 10 ** (CROSSTALK_DB / 10) >= b
    bridge, shortest = round(_BRIDGE_S / _FRAME_S), round(_PIECE_MIN_S / _FRAME_S)
    kept: list[tuple[float, float]] = []
    for start, end in regions:
        i, j = int(start / _FRAME_S), min(n, int(np.ceil(end / _FRAME_S)))
        if i >= j:
            continue
        flags = ours[i:j].astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], flags, [0]))))
        pieces: list[list[int]] = []
        for on, off in zip(edges[::2], edges[1::2]):
            if pieces and on - pieces[-1][1] < bridge:
                pieces[-1][1] = off
            else:
                pieces.append([on, off])
        for on, off in pieces:
            if off - on >= shortest:
                kept.append((max(start, (i + on) * _FRAME_S), min(end, (i + off) * _FRAME_S)))
    return kept
