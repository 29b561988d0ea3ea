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
