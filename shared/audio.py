"""Audio decoding: any common container/codec, any rate and channel count -> 16 kHz mono float32.

soundfile (libsndfile) reads WAV, FLAC, OGG/Vorbis/Opus and MP3 fast and lets us check the header
before reading a sample; everything else (M4A/AAC, odd WAV codecs, video containers) goes through
FFmpeg via PyAV, decoded and resampled frame by frame so a bogus header cannot make us allocate
more than the duration limit allows.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from shared.errors import AudioDecodeError, AudioTooLongError, InputError

SAMPLE_RATE = 16_000
# below this RMS (about -80 dBFS) a recording carries no usable speech
SILENCE_RMS = 1e-4
# the highest rate real recorders use; anything above is a forged header
MAX_SAMPLE_RATE = 768_000
# below this no speech is left (telephony is 8 kHz); a 1 Hz WAV of 28 KB is 3.9 h once resampled
MIN_SAMPLE_RATE = 4_000
# above this many (orig/g) x (target/g) taps, resample() leaves torchaudio for libswresample
_MAX_SINC_KERNEL = 1 << 20
# files longer than this (seconds) are decoded and resampled block by block
_LONG_FILE_S = 600

AudioSource = Union[str, os.PathLike, bytes, BinaryIO]


@dataclass(frozen=True)
class Audio:
    """Decoded mono waveform at :data:`SAMPLE_RATE`."""

    samples: np.ndarray  # (num_samples,) float32
    sample_rate: int = SAMPLE_RATE

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate

    def as_pyannote(self) -> dict:
        """The in-memory form pyannote.audio pipelines accept (no second decode)."""
        import torch

        return {"waveform": torch.from_numpy(self.samples).unsqueeze(0), "sample_rate": self.sample_rate}


def _open(source: AudioSource) -> BinaryIO:
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        return open(Path(source), "rb")
    return source


def _downmix(data: np.ndarray) -> np.ndarray:
    return data.mean(axis=1, dtype=np.float32) if data.ndim == 2 else data.astype(np.float32, copy=False)


def _check_sample_rate(rate: int) -> None:
    # a header can declare any rate; resampling from an absurd one costs memory in proportion
    # (libswresample needs ~470 MB for 50 MHz and fails outright near 2 GHz)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioDecodeError(
            f"sample rate {rate} Hz is not supported ({MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz)"
        )


def _stream_resample(blocks, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono blocks with FFmpeg's libswresample, keeping its filter state across blocks."""
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_sr)
    step = orig_sr * 10  # ten seconds per frame keeps each FFmpeg buffer small
    out: list[np.ndarray] = []
    for block in blocks:
        for start in range(0, len(block), step):
            chunk = np.ascontiguousarray(block[start : start + step], dtype=np.float32).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            frame.sample_rate = orig_sr
            out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _resample_swr(samples: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample with libswresample, whose cost does not depend on how the rates divide."""
    return _stream_resample([samples], orig_sr, target_sr)


def resample(samples: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    # nothing to resample (a header with no frames): torchaudio raises RuntimeError on empty input
    if orig_sr == target_sr or samples.size == 0:
        return samples
    _check_sample_rate(orig_sr)
    # torchaudio builds a sinc kernel of about (orig/g) x (target/g) taps, g = gcd of the rates:
    # tiny for the usual rates (44100 -> 441 x 160) but a 1 s WAV at 44101 Hz (g = 1) asked for
    # 12 GB and 50 s of CPU. Rates that divide badly go through libswresample instead.
    g = math.gcd(orig_sr, target_sr)
    if (orig_sr // g) * (target_sr // g) > _MAX_SINC_KERNEL:
        return _resample_swr(samples, orig_sr, target_sr)
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(np.ascontiguousarray(samples)), orig_sr, target_sr).numpy()


def _mono_blocks(snd, seconds: int = 60):
    """Down-mixed minute-long blocks until libsndfile has no more frames.

    Reads until a short read rather than trusting the header's frame count: for a truncated MP3
    that count is an estimate, and ``SoundFile.blocks`` would pad up to it.
    """
    size = snd.samplerate * seconds
    while True:
        block = snd.read(size, dtype="float32", always_2d=True)
        if len(block):
            yield _downmix(block)
        if len(block) < size:
            return


def _read_soundfile(fh: BinaryIO, max_duration: float) -> np.ndarray | None:
    """Decode with libsndfile; ``None`` when libsndfile does not know the format."""
    import soundfile as sf

    start = fh.tell()
    try:
        with sf.SoundFile(fh) as snd:
            if snd.samplerate <= 0 or snd.channels <= 0:
                raise AudioDecodeError("audio header declares no samples or channels")
            _check_sample_rate(snd.samplerate)
            # a header can claim anything: check what it claims before allocating for it
            if snd.frames > max_duration * snd.samplerate:
                raise AudioTooLongError(
                    f"audio is {snd.frames / snd.samplerate:.0f} s long; the limit is {max_duration:.0f} s"
                )
            rate = snd.samplerate
            if snd.frames > _LONG_FILE_S * rate and rate != SAMPLE_RATE:
                # Hours-long input: down-mix and resample block by block so that only the 16 kHz
                # mono result is ever held whole (a 1 h 48 kHz stereo file would otherwise take
                # 1.4 GB as float32 before down-mixing).
                return _stream_resample(_mono_blocks(snd), rate)
            mono = np.concatenate(list(_mono_blocks(snd)) or [np.zeros(0, dtype=np.float32)])
    except sf.LibsndfileError:
        fh.seek(start)
        return None
    except RuntimeError:  # older soundfile raises RuntimeError for unknown formats
        fh.seek(start)
        return None
    return resample(mono, rate)


def _read_pyav(fh: BinaryIO, max_duration: float) -> np.ndarray:
    import av

    try:
        container = av.open(fh, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise AudioDecodeError(f"not a decodable audio file ({exc.__class__.__name__})") from exc
    with container:
        if not container.streams.audio:
            raise AudioDecodeError("file has no audio stream")
        stream = container.streams.audio[0]
        limit = int(max_duration * SAMPLE_RATE)
        chunks: list[np.ndarray] = []
        total = 0

        def keep(frames: list) -> None:
            nonlocal total
            for out in frames:
                chunk = out.to_ndarray().reshape(-1)
                total += len(chunk)
                if total > limit:
                    raise AudioTooLongError(f"audio is longer than the limit of {max_duration:.0f} s")
                chunks.append(chunk)

        resampler = None
        setup: tuple | None = None
        try:
            for frame in container.decode(stream):
                _check_sample_rate(frame.sample_rate)
                # PyAV's resampler is fixed to its first frame's rate/layout/format and raises
                # ValueError on any other; a stream may change them (concatenated files, or a
                # corrupt AAC header), so drain the old resampler and start a new one
                params = (frame.sample_rate, frame.layout.name, frame.format.name)
                if params != setup:
                    if resampler is not None:
                        keep(resampler.resample(None))
                    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
                    setup = params
                keep(resampler.resample(frame))
            if resampler is not None:
                keep(resampler.resample(None))
        # PyAV raises ValueError for frames it cannot convert: corrupt data like any other
        except (av.FFmpegError, ValueError) as exc:
            if not chunks:
                raise AudioDecodeError(f"audio stream could not be decoded ({exc.__class__.__name__})") from exc
            # a truncated file: keep what decoded, as FFmpeg's own tools do
    if not chunks:
        raise AudioDecodeError("audio stream holds no samples")
    return np.concatenate(chunks).astype(np.float32, copy=False)


@dataclass(frozen=True)
class AudioInfo:
    """What a container header declares, read without decoding a sample."""

    duration: float | None
    sample_rate: int | None


def probe(path: str | os.PathLike) -> AudioInfo | None:
    """Duration and sample rate from the header (libsndfile, else FFmpeg); None if unreadable."""
    import soundfile as sf

    try:
        with sf.SoundFile(path) as snd:
            rate = int(snd.samplerate)
            return AudioInfo(snd.frames / rate if rate > 0 else None, rate)
    except Exception:  # noqa: BLE001 - not a libsndfile format: ask FFmpeg
        pass
    import av

    try:
        with av.open(str(path), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            rate = stream.sample_rate or stream.codec_context.sample_rate or None
            if stream.duration is not None and stream.time_base is not None:
                duration: float | None = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = None
            return AudioInfo(duration, rate)
    except Exception:  # noqa: BLE001 - the worker's decoder reports what is wrong (415)
        return None


def check_audio_limits(
    path: str | os.PathLike, *, max_duration: float, min_sample_rate: int = MIN_SAMPLE_RATE, hint: str = ""
) -> AudioInfo | None:
    """Refuse from the header alone what would tie a worker up for hours: too long, or a rate
    so low that resampling multiplies it (413 / 415)."""
    info = probe(path)
    if info is None:
        return None
    if info.sample_rate is not None and info.sample_rate < min_sample_rate:
        raise AudioDecodeError(f"sample rate {info.sample_rate} Hz is below the minimum of {min_sample_rate} Hz")
    if info.duration is not None and info.duration > max_duration:
        raise AudioTooLongError(f"audio is {info.duration:.0f} s long; the limit is {max_duration:.0f} s{hint}")
    return info


def load_audio(
    source: AudioSource,
    *,
    max_duration: float = 4 * 3600.0,
    min_duration: float = 0.5,
    reject_silence: bool = True,
) -> Audio:
    """Decode ``source`` (path, bytes or binary file object) into 16 kHz mono float32.

    Raises :class:`~shared.errors.InputError` subclasses for anything a caller sent wrong.
    """
    owned = isinstance(source, (bytes, bytearray, str, os.PathLike))
    fh = _open(source)
    try:
        head = fh.read(16)
        if not head:
            raise AudioDecodeError("file is empty")
        fh.seek(0)
        samples = _read_soundfile(fh, max_duration)
        if samples is None:
            fh.seek(0)
            samples = _read_pyav(fh, max_duration)
    finally:
        if owned:
            fh.close()
    return validate_samples(samples, min_duration=min_duration, max_duration=max_duration, reject_silence=reject_silence)


def validate_samples(
    samples: np.ndarray, *, min_duration: float, max_duration: float, reject_silence: bool = True
) -> Audio:
    if samples.size == 0:
        raise AudioDecodeError("audio holds no samples")
    if not np.all(np.isfinite(samples)):
        raise InputError("audio holds non-finite samples (NaN or infinity)")
    duration = samples.size / SAMPLE_RATE
    if duration < min_duration:
        raise InputError(f"audio is {duration:.2f} s long; at least {min_duration:.2f} s is needed")
    if duration > max_duration:
        raise AudioTooLongError(f"audio is {duration:.0f} s long; the limit is {max_duration:.0f} s")
    if reject_silence and float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) < SILENCE_RMS:
        raise InputError("audio is silent: no signal to analyse")
    # clip rather than reject: some encoders overshoot full scale slightly
    return Audio(np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False))
