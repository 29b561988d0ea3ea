"""Audio decoding: any common container/codec, any rate and channel count -> 16 kHz mono, held as float16.

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

from shared.audio_limits import (  # noqa: F401  (re-exported)
    MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, PYAV_OPTIONS, UNKNOWN_FRAMES, AudioInfo, check_audio_limits, probe,
)
from shared.errors import AudioDecodeError, AudioTooLongError, InputError

SAMPLE_RATE = 16_000
# below this RMS (about -80 dBFS) a recording carries no usable speech
SILENCE_RMS = 1e-4
# above this many (orig/g) x (target/g) taps, resample() leaves torchaudio for libswresample
_MAX_SINC_KERNEL = 1 << 20
# files longer than this (seconds) are decoded and resampled block by block
_LONG_FILE_S = 600
# at most this many samples (all channels together) in one decoded block: 16 MiB as float32.
# A 64-channel 384 kHz WAV read a minute at a time took 5.9 GB per block.
_BLOCK_SAMPLES = 1 << 22
# files up to this many samples (all channels) are decoded whole and resampled by torchaudio,
# as before; larger ones stream through libswresample block by block
_WHOLE_FILE_SAMPLES = 1 << 24
# libsndfile decoding less than this share of what the header declares is decoded again by
# FFmpeg, which skips damaged packets where libsndfile's MP3 decoder stops (load_audio)
_SHORT_READ = 0.9

AudioSource = Union[str, os.PathLike, bytes, BinaryIO]


# Decoded audio is held as float16: half of float32's 230 MB an hour (920 MB for 4 h), which
# is most of what a job adds to a worker. Its 11-bit mantissa keeps every sample to 1/2048 of
# its own magnitude (about 66 dB under the signal at any level, finer than 16-bit PCM for quiet
# input, which int16 would have quantised), far below what segmentation or CAM++ can hear.
# Models get float32, per batch or per slice.
STORAGE_DTYPE = np.float16


@dataclass(frozen=True)
class Audio:
    """Decoded mono waveform at :data:`SAMPLE_RATE`."""

    samples: np.ndarray  # (num_samples,) float16 when decoded here (STORAGE_DTYPE); float32 too
    sample_rate: int = SAMPLE_RATE

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate

    def float32(self) -> np.ndarray:
        """The samples as float32 (a copy when they are held as float16), for arithmetic."""
        return np.asarray(self.samples, dtype=np.float32)

    def as_pyannote(self, *, compact: bool = False) -> dict:
        """The in-memory form pyannote.audio pipelines accept (no second decode).

        float32 unless ``compact``: a pipeline that casts each batch itself (the embedded
        diarization) gets the stored samples without a float32 copy of the whole recording.
        """
        import torch

        samples = self.samples if compact else self.float32()
        return {"waveform": torch.from_numpy(samples).unsqueeze(0), "sample_rate": self.sample_rate}


def _open(source: AudioSource) -> BinaryIO:
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        return open(Path(source), "rb")
    return source


def _downmix(data: np.ndarray) -> np.ndarray:
    """(frames, channels) -> (frames,) float32 mean; as ``data.mean(axis=1, dtype=float32)``.

    Channel by channel: numpy's mean over a short last axis is a strided reduction, 0.3 s per
    10 min of stereo, a third of decoding a 44.1 kHz FLAC (2 s of an hour, which on a GPU is a
    third of the job). The same additions in the same order, so the same floats, up to 7 channels
    (numpy pairs them from 8 on: within 2.4e-7 there)."""
    if data.ndim != 2:
        return data.astype(np.float32, copy=False)
    out = data[:, 0].astype(np.float32)
    for channel in range(1, data.shape[1]):
        out += data[:, channel]
    if data.shape[1] > 1:
        out /= np.float32(data.shape[1])
    return out


def _check_sample_rate(rate: int) -> None:
    # a header can declare any rate; resampling from an absurd one costs memory in proportion
    # (libswresample needs ~470 MB for 50 MHz and fails outright near 2 GHz)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioDecodeError(
            f"sample rate {rate} Hz is not supported ({MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz)"
        )


class _Collector:
    """The 16 kHz mono result, written in place as blocks arrive.

    One buffer sized from the header's length (np.zeros: the kernel hands out zeroed pages only
    when they are first written, so an over-estimate costs nothing), instead of a list of chunks
    and a concatenation that held the result twice. Runs of exact zeros (digital silence) are
    skipped, not written: a file that is silent throughout never commits its buffer and is
    refused at the end without having cost its decoded size (3.9 h of silence took 4.1 GB).
    """

    def __init__(self, max_duration: float, expected_s: float | None = None) -> None:
        # a little slack over the limit for resampling's rounding; validate_samples is exact
        self.limit = int(max_duration * SAMPLE_RATE) + SAMPLE_RATE
        capacity = int(expected_s * SAMPLE_RATE) + SAMPLE_RATE if expected_s else 60 * SAMPLE_RATE
        try:
            self.buffer = np.zeros(max(1, min(capacity, self.limit)), dtype=STORAGE_DTYPE)
        except MemoryError:  # a header claiming more than the machine could map: grow instead
            self.buffer = np.zeros(60 * SAMPLE_RATE, dtype=STORAGE_DTYPE)
        self.size = 0
        self.loud = False
        self.max_duration = max_duration
        self.expected_s = expected_s  # what the header declared, when it declared a length

    def _reserve(self, n: int) -> None:
        if self.size + n > self.limit:
            raise AudioTooLongError(f"audio is longer than the limit of {self.max_duration:.0f} s")
        if self.size + n > len(self.buffer):
            # the header under-estimated (a truncated MP3's frame count, no duration at all)
            grown = np.zeros(min(self.limit, max(2 * len(self.buffer), self.size + n)), dtype=STORAGE_DTYPE)
            grown[: self.size] = self.buffer[: self.size]
            self.buffer = grown

    def add(self, chunk: np.ndarray) -> None:
        n = len(chunk)
        self._reserve(n)
        if chunk.any():
            # checked before the cast: float16 would turn a finite 1e30 into infinity; clipped
            # rather than rejected, as some encoders overshoot full scale slightly (nothing
            # finite then overflows float16)
            if not np.all(np.isfinite(chunk)):
                raise InputError("audio holds non-finite samples (NaN or infinity)")
            np.clip(chunk, -1.0, 1.0, out=self.buffer[self.size : self.size + n], casting="same_kind")
            self.loud = True
        self.size += n

    def skip(self, n: int) -> None:
        """``n`` samples of silence: already zero in the buffer."""
        if n > 0:
            self._reserve(n)
            self.size += n

    def samples(self) -> np.ndarray:
        return self.buffer[: self.size]


class _StreamResampler:
    """Mono blocks at ``orig_sr`` into a collector at 16 kHz, with FFmpeg's libswresample.

    The filter state is kept across blocks. An all-zero block is not resampled at all: its 16 kHz
    length is skipped in the collector (the filter is flushed before it and started afresh
    after, which only touches samples that are silent anyway).
    """

    def __init__(self, orig_sr: int, out: _Collector) -> None:
        self.orig_sr, self.out = orig_sr, out
        self.resampler = None
        self.consumed = 0  # input samples seen, to keep the output aligned across skipped blocks

    def _emit(self, frames) -> None:
        for f in frames:
            self.out.add(f.to_ndarray().reshape(-1))

    def feed(self, block: np.ndarray) -> None:
        import av

        step = self.orig_sr * 10  # ten seconds per frame keeps each FFmpeg buffer small
        for start in range(0, len(block), step):
            chunk = np.ascontiguousarray(block[start : start + step], dtype=np.float32)
            self.consumed += len(chunk)
            if not chunk.any():
                self.flush()
                self.out.skip(round(self.consumed * SAMPLE_RATE / self.orig_sr) - self.out.size)
                continue
            if self.resampler is None:
                self.resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = self.orig_sr
            self._emit(self.resampler.resample(frame))

    def flush(self) -> None:
        if self.resampler is not None:
            self._emit(self.resampler.resample(None))
            self.resampler = None


def _stream_resample(blocks, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono blocks with libswresample (whole arrays; the decoders use _StreamResampler)."""
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_sr)
    step = orig_sr * 10
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
    """Down-mixed blocks (a minute, or fewer frames when there are many channels) until
    libsndfile has no more frames.

    Reads until a short read rather than trusting the header's frame count: for a truncated MP3
    that count is an estimate, and ``SoundFile.blocks`` would pad up to it.
    """
    size = max(1, min(snd.samplerate * seconds, _BLOCK_SAMPLES // snd.channels))
    while True:
        block = snd.read(size, dtype="float32", always_2d=True)
        if len(block):
            yield _downmix(block)
        if len(block) < size:
            return


def _read_soundfile(fh: BinaryIO, max_duration: float) -> _Collector | None:
    """Decode with libsndfile; ``None`` when libsndfile does not know the format."""
    import soundfile as sf

    start = fh.tell()
    try:
        with sf.SoundFile(fh) as snd:
            if snd.samplerate <= 0 or snd.channels <= 0:
                raise AudioDecodeError("audio header declares no samples or channels")
            _check_sample_rate(snd.samplerate)
            # libsndfile's "length unknown" (a FLAC whose encoder wrote to a pipe and could not
            # go back to fill in STREAMINFO): streamed, the collector holding it to the limit
            unknown = snd.frames >= UNKNOWN_FRAMES
            # a header can claim anything: check what it claims before allocating for it
            if not unknown and snd.frames > max_duration * snd.samplerate:
                raise AudioTooLongError(
                    f"audio is {snd.frames / snd.samplerate:.0f} s long; the limit is {max_duration:.0f} s"
                )
            rate = snd.samplerate
            out = _Collector(max_duration, None if unknown else snd.frames / rate)
            if unknown or snd.frames > _LONG_FILE_S * rate or snd.frames * snd.channels > _WHOLE_FILE_SAMPLES:
                # Long or wide input: down-mix and resample block by block so that only the 16
                # kHz mono result is ever held whole (a 1 h 48 kHz stereo file would otherwise
                # take 1.4 GB as float32 before down-mixing, a 1 GB 64-channel one 5.5 GB).
                if rate == SAMPLE_RATE:
                    for block in _mono_blocks(snd):
                        out.add(block)
                else:
                    stream = _StreamResampler(rate, out)
                    for block in _mono_blocks(snd):
                        stream.feed(block)
                    stream.flush()
                return out
            mono = np.concatenate(list(_mono_blocks(snd)) or [np.zeros(0, dtype=np.float32)])
    except sf.LibsndfileError:
        fh.seek(start)
        return None
    except RuntimeError:  # older soundfile raises RuntimeError for unknown formats
        fh.seek(start)
        return None
    out.add(resample(mono, rate))
    return out


def _read_pyav(fh: BinaryIO, max_duration: float) -> _Collector:
    import av

    try:
        # container demuxers only (shared.audio_limits.DEMUXERS): left to autodetect, FFmpeg
        # followed a concat list in an upload to a file under the worker's working directory
        # and decoded that instead, and an SDP description held the worker 20 s on a UDP port
        container = av.open(fh, mode="r", metadata_errors="ignore", **PYAV_OPTIONS)
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise AudioDecodeError(f"not a decodable audio file ({exc.__class__.__name__})") from exc
    with container:
        if not container.streams.audio:
            raise AudioDecodeError("file has no audio stream")
        stream = container.streams.audio[0]
        declared = container.duration / av.time_base if container.duration else None
        collected = _Collector(max_duration, declared)

        def keep(frames: list) -> None:
            for out in frames:
                collected.add(out.to_ndarray().reshape(-1))

        resampler = None
        setup: tuple | None = None

        def frames():
            # packet by packet: a corrupt packet (a damaged frame of an MP3, a bad AAC block) is
            # skipped, as FFmpeg's own tools do, instead of ending the decode there
            for packet in container.demux(stream):
                try:
                    decoded = packet.decode()
                except (av.FFmpegError, ValueError):
                    continue
                yield from decoded

        try:
            for frame in frames():
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
            if not collected.size:
                raise AudioDecodeError(f"audio stream could not be decoded ({exc.__class__.__name__})") from exc
            # a truncated file: keep what decoded, as FFmpeg's own tools do
    if not collected.size:
        raise AudioDecodeError("audio stream holds no samples")
    return collected


def load_audio(
    source: AudioSource,
    *,
    max_duration: float = 4 * 3600.0,
    min_duration: float = 0.5,
    reject_silence: bool = True,
) -> Audio:
    """Decode ``source`` (path, bytes or binary file object) into 16 kHz mono samples (float16: STORAGE_DTYPE).

    Raises :class:`~shared.errors.InputError` subclasses for anything a caller sent wrong.
    """
    owned = isinstance(source, (bytes, bytearray, str, os.PathLike))
    fh = _open(source)
    try:
        head = fh.read(16)
        if not head:
            raise AudioDecodeError("file is empty")
        fh.seek(0)
        collected = _read_soundfile(fh, max_duration)
        if collected is None:
            fh.seek(0)
            collected = _read_pyav(fh, max_duration)
        elif collected.expected_s is not None and collected.size < _SHORT_READ * collected.expected_s * SAMPLE_RATE:
            # libsndfile's MP3 decoder (mpg123) gives up at the first stretch of damage it cannot
            # resync past and reports the end of the file: 100 damaged bytes in a 10 min MP3 left
            # 66 s of it, silently. FFmpeg skips the damaged packets; the longer decode is kept
            fh.seek(0)
            try:
                other = _read_pyav(fh, max_duration)
            except AudioDecodeError:
                other = None
            if other is not None and other.size > collected.size:
                collected = other
    finally:
        if owned:
            fh.close()
    samples = collected.samples()
    if reject_silence and not collected.loud and samples.size / SAMPLE_RATE >= min_duration:
        # nothing but exact zeros: refused before any pass over the (never written) buffer
        raise InputError("audio is silent: no signal to analyse")
    return validate_samples(samples, min_duration=min_duration, max_duration=max_duration, reject_silence=reject_silence)


def validate_samples(
    samples: np.ndarray, *, min_duration: float, max_duration: float, reject_silence: bool = True
) -> Audio:
    """Checks of the decoded result as a whole: its length and its level. Each sample was
    checked finite and clipped to full scale as it was collected (``_Collector.add``)."""
    if samples.size == 0:
        raise AudioDecodeError("audio holds no samples")
    duration = samples.size / SAMPLE_RATE
    if duration < min_duration:
        raise InputError(f"audio is {duration:.2f} s long; at least {min_duration:.2f} s is needed")
    if duration > max_duration:
        raise AudioTooLongError(f"audio is {duration:.0f} s long; the limit is {max_duration:.0f} s")
    if reject_silence:
        # in slices: a float64 square of a 3.9 h array took 1.8 GB more
        squares = 0.0
        step = 1 << 20
        for start in range(0, samples.size, step):
            part = samples[start : start + step].astype(np.float64)
            squares += float(np.dot(part, part))
        if math.sqrt(squares / samples.size) < SILENCE_RMS:
            raise InputError("audio is silent: no signal to analyse")
    return Audio(samples)
