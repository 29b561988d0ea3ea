"""Recording conditions laid over the clean conversations: rooms, telephone lines, noise.

The clips of ``../shared/data`` are close-talk read speech. Users send meetings taken by one
microphone across a room, call-centre calls through a telephone line, and noisy podcasts; the
clustering threshold is only as good as the conditions it was checked under. Each condition here
is a standard, documented degradation, applied per talker where it is per talker in life:

- ``room``: each talker at their own place in a reverberant room (their own synthetic impulse
  response, RT60 0.3-0.8 s, direct-to-reverberant ratio 0-10 dB) and their own level (+-6 dB),
  with background noise 15 dB below the speech;
- ``phone``: the conversation through a G.711 line (8 kHz, 300-3400 Hz, 8-bit mu-law) with line
  noise 25 dB below the speech, brought back to 16 kHz as a worker would;
- ``mobile``: the same line keeping its low end (100-3400 Hz), as mobile and VoIP calls often do,
  which the telephone detector (``engine.channel``) does not take for a line;
- ``narrowband``: the conversation recorded at 8 kHz and brought back to 16 kHz, nothing else
  (what separates a telephone line's band from the rest of it);
- ``noisy``: close-talk speech under background noise 5 dB below it.

Impulse responses are Gaussian noise under an exponential envelope (Polack's model, the usual
stand-in for a measured room response when none is at hand), deterministic per seed.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import signal

from engine.audio import SAMPLE_RATE, load_audio

CONDITIONS = ("clean", "room", "phone", "mobile", "narrowband", "noisy")


@dataclass(frozen=True)
class Condition:
    name: str
    data_dir: str = "../shared/data/speech"
    # one room for every part of a long recording (a meeting's talkers keep their seats)
    room_seed: int | None = None

    def __post_init__(self) -> None:
        if self.name not in CONDITIONS:  # a misspelt condition would pass the audio through clean
            raise ValueError(f"unknown condition {self.name!r}; one of {', '.join(CONDITIONS)}")

    def talkers(self, speakers: Sequence[str], seed: int) -> dict[str, "Talker"]:
        """Each talker's own room position and level (deterministic in the seed)."""
        rng = np.random.default_rng(10_000 + (seed if self.room_seed is None else self.room_seed))
        out = {}
        for speaker in sorted(set(speakers)):
            if self.name == "room":
                rt60 = float(rng.uniform(0.3, 0.8))
                drr_db = float(rng.uniform(0.0, 10.0))
                out[speaker] = Talker(room_impulse_response(rt60, drr_db, rng), 10 ** (rng.uniform(-6, 6) / 20))
            else:
                out[speaker] = Talker(None, 1.0)
        return out

    def mix(self, audio: np.ndarray, seed: int) -> np.ndarray:
        """What the microphone or the line does to the whole conversation."""
        rng = np.random.default_rng(20_000 + seed)
        if self.name == "room":
            audio = add_noise(audio, background_noise(len(audio), rng, self.data_dir), 15.0)
        elif self.name == "phone":
            audio = telephone(add_noise(audio, rng.standard_normal(len(audio)).astype(np.float32), 25.0))
        elif self.name == "mobile":
            audio = telephone(add_noise(audio, rng.standard_normal(len(audio)).astype(np.float32), 25.0), low_hz=100)
        elif self.name == "narrowband":
            audio = signal.resample_poly(signal.resample_poly(audio, 1, 2), 2, 1).astype(np.float32)
        elif self.name == "noisy":
            audio = add_noise(audio, background_noise(len(audio), rng, self.data_dir), 5.0)
        return audio


@dataclass(frozen=True)
class Talker:
    impulse_response: np.ndarray | None
    gain: float

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        if self.impulse_response is not None:
            wet = signal.fftconvolve(samples, self.impulse_response)[: len(samples)]
            samples = wet * (rms(samples) / max(rms(wet), 1e-9))
        return (samples * self.gain).astype(np.float32)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def room_impulse_response(rt60: float, drr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Direct path, then a diffuse tail decaying 60 dB in ``rt60`` seconds, ``drr_db`` below it."""
    n = int(rt60 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-6.908 * t / rt60)
    tail[: int(0.002 * SAMPLE_RATE)] = 0.0  # the first reflections arrive after the direct sound
    tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail**2))
    tail[0] = 1.0
    return tail.astype(np.float32)


def background_noise(n: int, rng: np.random.Generator, data_dir: str) -> np.ndarray:
    """``n`` samples of the recorded noises of ``data_dir/noise``, in random order, looped."""
    paths = sorted(glob.glob(os.path.join(data_dir, "noise", "*.wav")))
    pieces, total = [], 0
    while total < n:
        piece = load_audio(paths[int(rng.integers(len(paths)))]).float32()
        piece = piece / max(rms(piece), 1e-9)
        pieces.append(piece)
        total += len(piece)
    return np.concatenate(pieces)[:n]


def add_noise(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """Noise scaled to ``snr_db`` below the speech's level where it speaks (not its silences)."""
    frames = speech[: len(speech) // 400 * 400].reshape(-1, 400)
    energy = np.mean(frames.astype(np.float64) ** 2, axis=1)
    active = energy[energy > energy.max() * 1e-4]
    level = float(np.sqrt(active.mean())) if active.size else rms(speech)
    return (speech + noise * (level / max(rms(noise), 1e-9) * 10 ** (-snr_db / 20))).astype(np.float32)


def telephone(audio: np.ndarray, low_hz: float = 300) -> np.ndarray:
    """G.711: 8 kHz, 300-3400 Hz (``low_hz``-3400), 8-bit mu-law; then back to 16 kHz."""
    narrow = signal.resample_poly(audio, 1, 2)
    sos = signal.butter(6, [low_hz, 3400], btype="bandpass", fs=8000, output="sos")
    narrow = signal.sosfilt(sos, narrow)
    peak = float(np.abs(narrow).max()) or 1.0
    x = np.clip(narrow / peak, -1, 1)
    mu = 255.0
    code = np.round((np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu) + 1) / 2 * 255)
    y = 2 * code / 255 - 1
    x = np.sign(y) * ((1 + mu) ** np.abs(y) - 1) / mu
    return signal.resample_poly(x * peak, 2, 1).astype(np.float32)
