"""Audio decoding: any common container/codec, any rate and channel count -> 16 kHz mono, held as float16.

soundfile (libsndfile) reads WAV, FLAC and OGG/Vorbis/Opus fast, a long file on several cores,
and lets us check the header before reading a sample; everything else (MP3, M4A/AAC, odd WAV
codecs, video containers) goes through FFmpeg via PyAV, decoded packet by packet and resampled in
blocks so a bogus header cannot make us allocate more than the duration limit allows.
"""

from __future__ import annotations

import contextvars
import io
import math
import os
import struct
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

import numpy as np

from shared.audio_limits import (  # noqa: F401  (re-exported)
    DECLARED_SLACK, MAX_CHANNELS, MAX_SAMPLE_RATE, MAX_STREAMS, MIN_SAMPLE_RATE, PYAV_OPTIONS, UNKNOWN_FRAMES, AudioInfo,
    NotAudioError, check_ape, check_audio_limits, check_channels, check_containers, check_decode_work, check_id3, check_matroska,
    check_mp4_edits, check_ogg_comments, check_riff_chunks, declared_duration, decode_work_factor, ffmpeg_input, flac_starts,
    id3_end, ogg_chained, ogg_link_starts, probe, pyav_options, stream_channels, wav_data_unsized, xing_count,
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
# FFmpeg, which skips damaged packets where libsndfile stops (load_audio)
_SHORT_READ = 0.9
# a long file libsndfile can seek in is decoded by up to this many threads (_decode_in_parallel),
# in blocks of at least 2 s (_parallel_plan)
_MAX_DECODE_THREADS = 8
# FFmpeg containers whose header states the length of what they hold (MP4/MOV: mvhd, mdhd and
# the sample tables; Matroska: its Duration, left out by recorders that cannot go back to write
# it; and an MP3's Xing header, _xing_seconds), not estimated from a bitrate as for other MP3s,
# ADTS AAC or MPEG streams: decoding one further than DECLARED_SLACK allows is refused
# (_Collector). The API and the worker's time limit take the length from the same header: an MP4
# whose edit list played its 60 s of media 1000 times (a 96 KB upload) passed the API as 60 s
# and decoded to 16.7 h (22 s, 1.9 GB), 20000 times ran to the 24 h limit (4 GB), and an MP3
# whose Xing header counted 100 of its 3336 frames passed as 3.5 s and decoded to 120 s.
# WavPack too: every block's header carries the file's total samples (its writers fill it in, or
# write -1 where they cannot: no length), and FFmpeg takes the first block's for the length but
# decodes every block there is. A 1.4 MB WavPack of 24 h of DC whose first block said 1 s passed
# the API as 1 s, a synchronous request decoded 30 min of it before its 413, and a job, held to
# 601 s for its "1 s", decoded all 24 h (21 s, 5.1 GB of RSS as the buffer grew) for the engine
# to run past that limit (504).
# WAV (and Wave64) and AIFF-C too, of the codecs libsndfile leaves to FFmpeg: FFmpeg's length for
# them is the data's size over the header's average byte rate, or the COMM chunk's frame count,
# fields anyone can write. A 4 MB WAV of TrueSpeech whose byte rate said 4 MB/s passed as 1 s and
# decoded to 3750 s (with the upload limit's 1 GB, to the 24 h limit: 2.7 GB of float16 under a
# job time limit of 601 s), a 2 MB AIFF-C of MACE counting 1 s of frames to 1500 s. And AVI,
# whose audio stream header (strh) counts its length: 70 s of MP3 counted as 1 s decoded whole;
# and ASF (WMA), whose File Properties state the play duration (a broadcast's, flagged as such,
# FFmpeg does not take): 70 s of WMA said 1 s. And CAF, whose length FFmpeg takes from its
# description's frames per packet (times the packets of its packet table, or of its data chunk's
# size at a constant bitrate), and RealMedia, from its stream header's duration: 70 s of ALAC or
# IMA ADPCM in CAF said 1 s with that one field rewritten, 70 s of AC-3 or RealAudio 14.4 in RM
# likewise, and each decoded whole
_DECLARED_FORMATS = ("mov", "matroska", "wv", "wav", "w64", "aiff", "avi", "asf", "caf", "rm")
# FFmpeg's frames with this many channels or more are converted interleaved (_read_pyav)
_PACKED_FROM = 8
# at most this many changes of rate, layout or sample format in one FFmpeg stream (_read_pyav):
# each drains and rebuilds the converters (0.4 ms), so ADTS frames alternating 8 and 96 kHz took
# 10x as long to decode as the same frames in two runs (0.48 s against 0.05 s for 1128 frames;
# a day of them about 9 min). Joined recordings change a few times, not on every frame
_MAX_FORMAT_CHANGES = 1000
# MP3 frames decoded and dropped before each such block (_parallel_plan): an MP3 frame may take
# its bits from up to 511 bytes of earlier frames (the bit reservoir), which mpg123 has not read
# right after a seek: a 32 kbps MP3 gave errors of 0.24 in its first frames, an 8 kbps one still
# 0.005 after 0.1 s, none from 0.25 s on. 9216 frames: 8 MPEG-1 frames, 16 of MPEG-2 (0.21 s at
# 44.1 kHz, 1.15 s at 8 kHz)
_MP3_MARGIN_FRAMES = 9216

AudioSource = Union[str, os.PathLike, bytes, BinaryIO]


# Decoded audio is held as float16: half of float32's 230 MB an hour (920 MB for 4 h), which
# is most of what a job adds to a worker. Its 11-bit mantissa keeps every sample to 1/2048 of
# its own magnitude (about 66 dB under the signal at any level, finer than 16-bit PCM for quiet
# input, which int16 would have quantised), far below what segmentation or CAM++ can hear.
# Models get float32, per batch or per slice.
STORAGE_DTYPE = np.float16


# a telephone line's rate (G.711, GSM, AMR-NB): what is recorded at it or below has no band above 4 kHz
NARROWBAND_RATE = 8000


@dataclass(frozen=True)
class Audio:
    """Decoded mono waveform at :data:`SAMPLE_RATE`."""

    samples: np.ndarray  # (num_samples,) float16 when decoded here (STORAGE_DTYPE); float32 too
    sample_rate: int = SAMPLE_RATE
    # the channels the file held (samples are their mean): a stereo call may carry one talker a
    # channel, which the diarization then uses (Engine.diarize, engine.channel.separated)
    channels: int = 1
    # the lowest sample rate the file's audio stream had before it was resampled to 16 kHz (None:
    # not decoded from a file): a recording at 8 kHz or less (a telephone call) carries nothing
    # above 4 kHz, and that moves where a verification threshold belongs (``narrowband``)
    source_rate: int | None = None

    @property
    def narrowband(self) -> bool:
        """Recorded at :data:`NARROWBAND_RATE` or less: no voice above 4 kHz in it."""
        return self.source_rate is not None and self.source_rate <= NARROWBAND_RATE

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


def _reopener(source: AudioSource) -> Callable[[], str | BinaryIO] | None:
    """What libsndfile can open another handle on the same bytes as ``_open(source)`` from, or
    None for a file object (which has one position only).

    A path is given as a path, for libsndfile to read itself: through a Python file object each
    of its small reads is a call back into Python that needs the GIL, and two handles side by side
    took 1.7 s for an hour of MP3 (then read by libsndfile) instead of 1.1 s.
    """
    if isinstance(source, bytes):
        return lambda: io.BytesIO(source)  # shares the bytes until written to
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        return lambda: path
    return None


# Set while a recording whose channels cancel in their mean is decoded again (load_audio): its
# first channel is taken instead of the mean
_FIRST_CHANNEL: contextvars.ContextVar[bool] = contextvars.ContextVar("first_channel", default=False)
# Set while one channel of a several-channel recording is decoded alone (load_channel)
_CHANNEL: contextvars.ContextVar[int | None] = contextvars.ContextVar("channel", default=None)


def _downmix(data: np.ndarray) -> np.ndarray:
    """(frames, channels) -> (frames,) float32 mean; as ``data.mean(axis=1, dtype=float32)``.
    The first channel alone while :data:`_FIRST_CHANNEL` is set.

    Channel by channel: numpy's mean over a short last axis is a strided reduction, 0.3 s per
    10 min of stereo, a third of decoding a 44.1 kHz FLAC (2 s of an hour, which on a GPU is a
    third of the job). The same additions in the same order, so the same floats, up to 7 channels
    (numpy pairs them from 8 on: within 2.4e-7 there)."""
    if data.ndim != 2:
        return data.astype(np.float32, copy=False)
    alone = _CHANNEL.get()
    if alone is not None:
        return data[:, min(alone, data.shape[1] - 1)].astype(np.float32)
    out = data[:, 0].astype(np.float32)
    if _FIRST_CHANNEL.get():
        return out
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

    def __init__(self, max_duration: float, expected_s: float | None = None, *, binding: bool = False) -> None:
        # a little slack over the limit for resampling's rounding; validate_samples is exact
        self.limit = int(max_duration * SAMPLE_RATE) + SAMPLE_RATE
        # ``binding``: the header's length is a promise (_DECLARED_FORMATS), held to within slack
        factor, slack = DECLARED_SLACK
        self.ceiling = int((factor * expected_s + slack) * SAMPLE_RATE) if binding and expected_s is not None else None
        capacity = int(expected_s * SAMPLE_RATE) + SAMPLE_RATE if expected_s else 60 * SAMPLE_RATE
        try:
            self.buffer = np.zeros(max(1, min(capacity, self.limit)), dtype=STORAGE_DTYPE)
        except MemoryError:  # a header claiming more than the machine could map: grow instead
            self.buffer = np.zeros(60 * SAMPLE_RATE, dtype=STORAGE_DTYPE)
        self.size = 0
        self.loud = False
        self.max_duration = max_duration
        self.expected_s = expected_s  # what the header declared, when it declared a length
        # what a second of the stream counts for (hold_to_work), and the stream it was set for
        self.work_factor = 1.0
        self.work_of: tuple[int, int] | None = None
        # audio tracks (streams) in the container, of which the first alone is decoded
        self.tracks = 1
        # the most channels the stream decoded had (hold_to_work), down-mixed to their mean
        self.channels = 1
        # the lowest sample rate it had (hold_to_work): Audio.source_rate
        self.lowest_rate: int | None = None

    def hold_to_work(self, rate: int, channels: int) -> None:
        """The stream decoded is ``channels`` at ``rate``: past 8 x 48 kHz each of its seconds
        counts for more of the limit (shared.audio_limits.decode_work_factor), so that a file whose
        header declares no length costs no more to decode than one the header check refused.
        A stream that changes its format is held to the costliest it took."""
        self.channels = max(self.channels, channels)
        self.lowest_rate = rate if self.lowest_rate is None else min(self.lowest_rate, rate)
        factor = decode_work_factor(rate, channels)
        if factor > self.work_factor:
            self.work_factor, self.work_of = factor, (rate, channels)

    def _reserve(self, n: int) -> None:
        if self.ceiling is not None and self.size + n > self.ceiling < self.limit:
            raise AudioDecodeError(
                f"audio decodes to more than its header declares ({self.expected_s:.0f} s): the file is damaged or forged"
            )
        if self.size + n > self.limit:
            raise AudioTooLongError(f"audio is longer than the limit of {self.max_duration:.0f} s")
        if self.work_of is not None and (self.size + n) * self.work_factor > self.limit:
            rate, channels = self.work_of
            raise AudioTooLongError(
                f"audio of {channels} channels at {rate} Hz is more to decode than {self.max_duration:.0f} s of "
                "8-channel 48 kHz audio, the limit; mix it down to fewer channels or a lower sample rate first"
            )
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

    def __init__(self, orig_sr: int, out: _Collector | _Offset) -> None:
        self.orig_sr, self.out = orig_sr, out
        self.resampler = None
        # input samples seen and 16 kHz samples given to ``out``, to keep the output aligned
        # across skipped blocks: counted here, so that ``out`` may already hold what came before
        self.consumed = 0
        self.emitted = 0

    def _emit(self, frames) -> None:
        for f in frames:
            chunk = f.to_ndarray().reshape(-1)
            self.emitted += len(chunk)
            self.out.add(chunk)

    def feed(self, block: np.ndarray) -> None:
        import av

        step = self.orig_sr * 10  # ten seconds per frame keeps each FFmpeg buffer small
        for start in range(0, len(block), step):
            chunk = np.ascontiguousarray(block[start : start + step], dtype=np.float32)
            self.consumed += len(chunk)
            if not chunk.any():
                self.flush()
                silent = round(self.consumed * SAMPLE_RATE / self.orig_sr) - self.emitted
                if silent > 0:
                    self.out.skip(silent)
                    self.emitted += silent
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


def _block_frames(snd, seconds: int = 60) -> int:
    """Frames per decoded block: a minute, or fewer when there are many channels."""
    return max(1, min(snd.samplerate * seconds, _BLOCK_SAMPLES // snd.channels))


def _mono_blocks(snd, seconds: int = 60):
    """Down-mixed blocks (a minute, or fewer frames when there are many channels) until
    libsndfile has no more frames.

    Reads until a short read rather than trusting the header's frame count: for a truncated MP3
    that count is an estimate, and ``SoundFile.blocks`` would pad up to it.
    """
    size = _block_frames(snd, seconds)
    while True:
        block = snd.read(size, dtype="float32", always_2d=True)
        if len(block):
            yield _downmix(block)
        if len(block) < size:
            return


def _decode_threads() -> int:
    """Threads to decode one long file with, at most :data:`_MAX_DECODE_THREADS`: as many as
    torch's where the engine has set them (``Settings.torch_threads``, what an operator gives a
    worker whose container has a CPU quota), else the cores this process may run on."""
    torch = sys.modules.get("torch")
    if torch is not None:
        cores = torch.get_num_threads()
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
    return max(1, min(_MAX_DECODE_THREADS, cores))


class _Offset:
    """A collector fed from ``drop`` 16 kHz samples before its end (a decode started a margin
    early): those are dropped, the rest passed on."""

    def __init__(self, out: _Collector, drop: int) -> None:
        self.out, self.drop = out, drop

    def add(self, chunk: np.ndarray) -> None:
        cut = min(self.drop, len(chunk))
        self.drop -= cut
        if cut < len(chunk):
            self.out.add(chunk[cut:])

    def skip(self, n: int) -> None:
        if n > 0:
            cut = min(self.drop, n)
            self.drop -= cut
            self.out.skip(n - cut)


def _one_pass(snd, out: _Collector, drop: int = 0) -> None:
    """``snd`` from where it stands to its end, down-mixed and at 16 kHz, into ``out``; the first
    ``drop`` 16 kHz samples (a margin decoded before where ``out`` stands) left out."""
    sink = _Offset(out, drop) if drop else out
    if snd.samplerate == SAMPLE_RATE:
        for block in _mono_blocks(snd):
            sink.add(block)
        return
    stream = _StreamResampler(snd.samplerate, sink)
    for block in _mono_blocks(snd):
        stream.feed(block)
    stream.flush()


def _parallel_plan(
    snd, reopen: Callable[[], str | BinaryIO] | None, threads: int, margin_frames: int = 2048
) -> tuple[int, int] | None:
    """(block frames, margin frames) for decoding ``snd`` in parallel, or None for one pass.

    Blocks start on whole 16 kHz samples (a multiple of ``rate / gcd(rate, 16000)`` frames: 441
    at 44.1 kHz), so that a resampler started afresh at a block's margin computes each of the
    block's own output samples from the same inputs with the same filter phase as one pass does.
    The margin is decoded and thrown away on either side: ``margin_frames`` or more (2048: 46 ms
    at 44.1 kHz), which covers libswresample's filter (32 taps at the lower rate: 91 frames at
    44.1 kHz) and primes a decoder that needs what came before a seek (Opus asks for 80 ms;
    libsndfile's own seeks in FLAC, Vorbis and Opus were exact without any; MP3 needs more,
    :data:`_MP3_MARGIN_FRAMES`).
    """
    if reopen is None or threads < 2 or not snd.seekable() or snd.frames >= UNKNOWN_FRAMES:  # length unknown
        return None
    rate = snd.samplerate
    # blocks of 15 s, or a quarter of one pass's largest block for many channels: with one being
    # decoded per thread and one waiting per thread, 8 threads hold about 60 MB in flight
    size = max(1, min(rate * 15, _BLOCK_SAMPLES // 4 // snd.channels))
    step = rate // math.gcd(rate, SAMPLE_RATE)
    size -= size % step
    margin = step * math.ceil(margin_frames / step)
    # blocks under 2 s (wide files: 32 or 64 channels of Ogg Opus) cost more than they save: each
    # is a seek and two margins, and 64-channel Opus took 1.8 times the CPU of one pass (2.4 s
    # against 1.3 s for 10 s of it), 32 channels 1.7 times, 8 channels (2.7 s blocks) 1.14 times
    if size <= 0 or snd.frames // size < 2 or margin > size or size < 2 * rate:
        return None
    return size, margin


def _ffmpeg_finds_more(reopen: Callable[[], str | BinaryIO], declared_s: float) -> bool:
    """Whether FFmpeg's MP3 demuxer makes the file over 1 % longer than libsndfile's header says.

    libsndfile takes an MP3's length from its first frame's Xing header and decodes no further:
    two MP3s joined end to end (a recorder's split files put together with cat) decoded as the
    first alone. FFmpeg's demuxer checks the header against the file's size (75 s declared of
    105 s: it says 105 s) and decodes the rest, so such a file goes to FFmpeg. Reads the header
    and a few frames only (milliseconds).
    """
    import av

    target = reopen()
    fh: BinaryIO | None = None
    try:
        # a path that cannot be opened again (gone, no descriptor left) as av.open's own refusal
        fh = open(target, "rb") if isinstance(target, str) else target
        # from behind its ID3 tags, as the header check and the decoder open it (ffmpeg_input)
        with av.open(ffmpeg_input(fh), mode="r", metadata_errors="ignore", **pyav_options()) as container:
            found = container.duration / av.time_base if container.duration else None
    except (av.FFmpegError, ValueError, OSError):
        return True  # let FFmpeg's own path say what it makes of it
    finally:
        if fh is not None:
            fh.close()
    return found is not None and found > 1.01 * declared_s + 0.5


Block = Union[np.ndarray, int]  # 16 kHz samples, or how many of digital silence


def _keep(out: _Collector, block: Block) -> None:
    if isinstance(block, int):
        out.skip(block)
    else:
        out.add(block)


def _blocks_in_order(handles: list, count: int, decode: Callable[[Any, int], tuple[Block, bool]],
                     out: _Collector) -> bool:
    """``decode(handle, i)`` for blocks 0..count-1, one thread per handle, into ``out`` in order.

    Block i goes to handle i % len(handles), each handle on a thread of its own: every handle only
    ever seeks forward, past the blocks the others decode (handles sent back and forth between
    blocks spent a third of their time seeking). At most one block per thread, and one more, is
    held ahead of ``out``. True when a block came back short: the file ends there.
    """
    threads = len(handles)
    lanes = [ThreadPoolExecutor(1, thread_name_prefix="decode") for _ in handles]
    pending: deque = deque()
    submitted = 0
    try:
        while True:
            while submitted < count and len(pending) < threads + 1:
                lane = submitted % threads
                # in the caller's context: _downmix reads _FIRST_CHANNEL in the lanes' threads
                pending.append(lanes[lane].submit(contextvars.copy_context().run, decode, handles[lane], submitted))
                submitted += 1
            if not pending:
                return False
            block, short = pending.popleft().result()
            _keep(out, block)
            if short:
                return True
    finally:
        for future in pending:
            future.cancel()
        # every thread must be done with its handle before the caller closes it (libsndfile on a
        # closed handle can crash the process): a job's time limit (SIGALRM, worker/deadline.py)
        # arriving during this wait is raised once the blocks are done, not in the middle. The
        # futures are waited for, not the threads: a Thread.join that a signal interrupted
        # returns at once the next time (CPython 3.11 marks the thread stopped)
        interrupted: BaseException | None = None
        while True:
            try:
                wait_for(pending)
                break
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                interrupted = exc
        for lane in lanes:
            lane.shutdown(wait=False)  # idle now: each thread ends on its own
        if interrupted is not None:
            raise interrupted


def _resampled_block(mono: np.ndarray, rate: int, lead: int, size: int, short: bool) -> Block:
    """The 16 kHz samples of ``mono[lead : lead + size]`` (``lead`` and ``size`` in whole steps),
    ``mono`` holding a margin on either side for the filter; to its end when ``short``."""
    if rate == SAMPLE_RATE:
        return mono[lead : lead + size]
    lo = lead * SAMPLE_RATE // rate
    if not mono.any():  # digital silence: nothing to resample, nothing to write
        return max(0, round(len(mono) * SAMPLE_RATE / rate) - lo) if short else size * SAMPLE_RATE // rate
    resampled = _resample_swr(mono, rate, SAMPLE_RATE)
    return resampled[lo : len(resampled) if short else lo + size * SAMPLE_RATE // rate]


def _decode_in_parallel(snd, reopen: Callable[[], str | BinaryIO], threads: int, size: int, margin: int,
                        out: _Collector, *, one_read_per_block: bool = False) -> None:
    """Decode, down-mix and resample ``snd`` into ``out`` with ``threads`` libsndfile handles
    side by side: the same samples as one pass (:func:`_mono_blocks` through a
    :class:`_StreamResampler`), bit for bit away from digital silence.

    libsndfile decodes on one core: an hour of 44.1 kHz FLAC took 2.5 s of the 3.9 s its
    decoding cost, before the engine could start, and resampling most of the rest. Its seeks land
    on the exact frame in every format it reads here (WAV, FLAC, Ogg Vorbis and Opus), so the
    blocks that lie wholly within the length the header declares are decoded by separate
    handles, each from its own offset less a margin, resampled on their own and cut to their own
    stretch; libsndfile and libswresample release the GIL while they work. Whatever lies past the
    last whole block is read by ``snd`` itself, in one pass from that block's end.

    A short block ends the decode where it falls, as a short read does in one pass (a truncated
    file). Any error a handle meets is raised as one pass would raise it. At most one block per
    thread, and one more, is held ahead of ``out``.

    ``one_read_per_block`` (MP3, whose reads must not be split: ``_read_soundfile``): the rest
    after the last whole block is read in one read too. soundfile reads no further than the
    length the header declares, in one pass as here; an MP3 that goes on past it is sent to
    FFmpeg before (``_ffmpeg_finds_more``).
    """
    import soundfile as sf

    rate = snd.samplerate
    whole_blocks = snd.frames // size
    handles: list = []
    opened: list = []
    try:
        for _ in range(threads):
            target = reopen()
            if not isinstance(target, str):
                opened.append(target)
            handle = sf.SoundFile(target)
            opened.append(handle)
            if (handle.samplerate, handle.channels, handle.frames) != (rate, snd.channels, snd.frames):
                raise sf.LibsndfileError(0, "file changed while it was being decoded")
            handles.append(handle)

        def decode(handle, index: int) -> tuple[Block, bool]:
            first = index * size
            begin = max(0, first - margin)
            handle.seek(begin)
            block = handle.read(first - begin + size + margin, dtype="float32", always_2d=True)
            short = len(block) < first - begin + size
            return _resampled_block(_downmix(block), rate, first - begin, size, short), short

        if _blocks_in_order(handles, whole_blocks, decode, out):
            return
    finally:
        for thing in reversed(opened):  # each SoundFile before the file under it
            thing.close()
    if one_read_per_block:
        # what is left, under a block, as a block of its own
        block, _ = decode(snd, whole_blocks)
        _keep(out, block)
        return
    # past the last whole block: one pass, started a margin early and what it gives for the
    # margin dropped (a whole number of 16 kHz samples: the margin is in whole steps)
    tail = whole_blocks * size
    begin = max(0, tail - margin)
    snd.seek(begin)
    _one_pass(snd, out, drop=(tail - begin) * SAMPLE_RATE // rate)


def _read_soundfile(
    fh: BinaryIO, max_duration: float, reopen: Callable[[], str | BinaryIO] | None = None, *, chains: bool = True,
    into: _Collector | None = None,
) -> _Collector | None:
    """Decode with libsndfile; ``None`` when libsndfile does not know the format, or (unless
    ``chains`` is false) when the file is a chained Ogg or one of unknown length, which FFmpeg
    decodes first.

    ``reopen`` gives another handle on the same bytes, for decoding a long file in parallel.

    libsndfile decodes a chained Ogg (links one after the other: recordings joined with cat, a
    radio stream's dump, a new link per track) to the end of its first link and stops there,
    reporting that link's length or none (shared.audio_limits.ogg_chained): 300 links of 0.1 s
    of Opus, 30 s in all, decoded to 0.1 s, and recordings of 7 s and 3 s joined to the first
    7 s, without a word. FFmpeg's Ogg demuxer reads every link of the same codec and layout;
    where a link changes them it cannot, and libsndfile's first link is kept (load_audio).
    """
    import soundfile as sf

    start = fh.tell()
    chained = False
    if chains and start == 0:
        # the first page's header and the last page, and where their streams are the same a
        # search for a second link (`cat a.ogg a.ogg` was decoded to half its length)
        chained = ogg_chained(fh)
        starts = None if chained else flac_starts(fh)
        if starts is not None:
            # FLACs joined, of which libsndfile reads the first alone (3 s and 5 s joined decoded
            # to 3 s): each decoded on its own; where one cannot be (a FLAC of no count, which
            # libsndfile cannot stream from a slice), FFmpeg decodes them all (None)
            joined = _read_flac_parts(fh, starts, max_duration)
            fh.seek(start)
            return joined
    try:
        with sf.SoundFile(fh) as snd:
            if snd.samplerate <= 0 or snd.channels <= 0:
                raise AudioDecodeError("audio header declares no samples or channels")
            if snd.frames == 0 and snd.format == "WAV" and start == 0 and wav_data_unsized(fh):
                # a data chunk of unknown size (a recorder writing to a stream): libsndfile reads
                # none of it, FFmpeg reads it to the end of the file, as the header check did
                fh.seek(start)
                return None
            _check_sample_rate(snd.samplerate)
            check_channels(snd.channels)  # each is decoded: 255 Opus channels cost a second a second
            # libsndfile's "length unknown" (a FLAC whose encoder wrote to a pipe and could not
            # go back to fill in STREAMINFO): streamed, the collector holding it to the limit
            unknown = snd.frames >= UNKNOWN_FRAMES
            if chains and snd.format == "OGG" and (unknown or chained):
                fh.seek(start)
                return None
            # a header can claim anything: check what it claims before allocating for it
            if not unknown and snd.frames > max_duration * snd.samplerate:
                raise AudioTooLongError(
                    f"audio is {snd.frames / snd.samplerate:.0f} s long; the limit is {max_duration:.0f} s"
                )
            if not unknown:
                check_decode_work(snd.frames / snd.samplerate, snd.samplerate, snd.channels, max_duration)
            rate = snd.samplerate
            # ``into``: a collector that already holds what came before (a chain's earlier links)
            out = into if into is not None else _Collector(max_duration, None if unknown else snd.frames / rate)
            out.hold_to_work(rate, snd.channels)
            # Long or wide input: down-mixed and resampled block by block so that only the 16 kHz
            # mono result is ever held whole (a 1 h 48 kHz stereo file would otherwise take 1.4
            # GB as float32 before down-mixing, a 1 GB 64-channel one 5.5 GB); on several cores
            # where the file allows (_parallel_plan)
            long = unknown or snd.frames > _LONG_FILE_S * rate or snd.frames * snd.channels > _WHOLE_FILE_SAMPLES
            threads = _decode_threads()
            if snd.format == "MP3":
                # libsndfile 1.2.2 (soundfile's own) corrupts a low-bitrate MP3 where one read
                # ends and the next begins: every minute of a 32 kbps file read by the minute, up
                # to 70 ms of wrong samples (errors of 0.2 of full scale) after each boundary;
                # read 4096 frames at a time, 90 % of the file. Its bit reservoir is not carried
                # across the reads. One read after a seek is right once the margin before it
                # has primed the decoder, so a long MP3 is decoded in parallel blocks of one read
                # each; anything else (a short file, one core, a file longer than its header
                # says) goes to FFmpeg, which decodes as one whole read of libsndfile's does.
                plan = _parallel_plan(snd, reopen, threads, _MP3_MARGIN_FRAMES) if long else None
                if plan is None or _ffmpeg_finds_more(reopen, snd.frames / rate):  # type: ignore[arg-type]
                    fh.seek(start)
                    return None
                _decode_in_parallel(snd, reopen, threads, *plan, out, one_read_per_block=True)  # type: ignore[arg-type]
                return out
            if long:
                plan = _parallel_plan(snd, reopen, threads)
                if plan is not None:
                    _decode_in_parallel(snd, reopen, threads, *plan, out)  # type: ignore[arg-type]
                else:
                    _one_pass(snd, out)
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


class _Slice:
    """Bytes ``start`` to ``end`` of a binary file, as a file of its own (for libsndfile)."""

    def __init__(self, fh: BinaryIO, start: int, end: int) -> None:
        self.fh, self.start, self.end = fh, start, end
        self.at = 0

    def read(self, size: int = -1) -> bytes:
        left = max(0, self.end - self.start - self.at)
        size = left if size is None or size < 0 else min(size, left)
        self.fh.seek(self.start + self.at)
        data = self.fh.read(size)
        self.at += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.at, os.SEEK_END: self.end - self.start}[whence]
        self.at = max(0, base + offset)
        return self.at

    def tell(self) -> int:
        return self.at


def _ogg_links(fh: BinaryIO) -> list[tuple[int, int]] | None:
    """The byte ranges of a chained Ogg's links (shared.audio_limits.ogg_link_starts), or None
    where ``fh`` is not an Ogg of more than one link, or of more than :data:`_MAX_FORMAT_CHANGES` + 1."""
    fh.seek(0)
    if fh.read(4) != b"OggS":
        fh.seek(0)
        return None
    starts = ogg_link_starts(fh, most=_MAX_FORMAT_CHANGES + 1)
    if starts is None or len(starts) < 2 or starts[0] != 0:
        return None
    size = fh.seek(0, os.SEEK_END)
    fh.seek(0)
    return list(zip(starts, starts[1:] + [size]))


def _read_ogg_links(fh: BinaryIO, max_duration: float) -> _Collector | None:
    """A chained Ogg whose links change codec, sample rate or channels, decoded link by link by
    libsndfile into one collector, each down-mixed and resampled to 16 kHz on its own; None where
    ``fh`` is not one.

    FFmpeg's Ogg demuxer stops at such a link (AVERROR_PATCHWELCOME) and libsndfile reads the
    first link alone: a recording of 5 s at 8 kHz and 5 s at 48 kHz joined with cat, or a mono
    and a stereo one, was analysed as its first 5 s, without a word. The links are decoded up to
    the first that cannot be (a link over MAX_CHANNELS, one libsndfile refuses), whose refusal
    stands where it is the first; the links together are held to ``max_duration``."""
    links = _ogg_links(fh)
    if links is None:
        return None
    # libsndfile holds a link's comment header whole, twice over (_read_pyav refused the chain for
    # it where that is why FFmpeg did not decode it)
    check_ogg_comments(fh, every_link=True)
    out = _Collector(max_duration)
    for index, (start, end) in enumerate(links):
        try:
            done = _read_soundfile(_Slice(fh, start, end), max_duration, chains=False, into=out)  # type: ignore[arg-type]
        except AudioDecodeError:
            if index == 0:
                raise
            break
        if done is None:
            if index == 0:
                return None
            break
    fh.seek(0)
    return out


def _read_flac_parts(fh: BinaryIO, starts: list[int], max_duration: float) -> _Collector | None:
    """FLACs joined with cat, beginning at ``starts`` (shared.audio_limits.flac_starts), decoded
    one by one by libsndfile into one collector, each down-mixed and resampled to 16 kHz on its
    own; None where one of them cannot be (FFmpeg then decodes the file: load_audio). libsndfile
    stops at the end of the first, and FFmpeg decodes on but not across a change of rate or
    channels (3 s at 16 kHz mono and 5 s at 44.1 kHz stereo decoded to 8.9 s)."""
    size = fh.seek(0, os.SEEK_END)
    fh.seek(0)
    out = _Collector(max_duration)
    # the first from the file's start, its ID3v2 tags with it, as libsndfile reads a file
    for start, end in zip([0] + starts[1:], starts[1:] + [size]):
        try:
            done = _read_soundfile(_Slice(fh, start, end), max_duration, chains=False, into=out)  # type: ignore[arg-type]
        except AudioDecodeError:  # too long (413) or not finite (422) stand as they are
            done = None
        if done is None:
            fh.seek(0)
            return None
    fh.seek(0)
    return out


def _xing_seconds(fh: BinaryIO) -> float | None:
    """The length an MP3's Xing/Info header counts (shared.audio_limits.xing_count), None where
    its first frame holds none that counts both frames and bytes. libsndfile (mpg123) takes the
    same count for the file's length: what the API's header check held the file to."""
    counted = xing_count(fh)
    return None if counted is None else counted[0]


# the most of an FLV's first tag read for its onMetaData duration (a writer's is a few hundred bytes)
_FLV_METADATA_BYTES = 64 << 10


def _flv_duration(fh: BinaryIO) -> float | None:
    """The duration (seconds, over 0) that an FLV's onMetaData states, where its first tag is that
    script tag and states one within its first :data:`_FLV_METADATA_BYTES`; None otherwise. Reads
    the file's start only, and leaves ``fh`` where it was."""
    where = fh.tell()
    try:
        fh.seek(0)
        head = fh.read(9)
        if len(head) < 9 or head[:3] != b"FLV":
            return None
        fh.seek(int.from_bytes(head[5:9], "big") + 4)  # past the header and PreviousTagSize0
        tag = fh.read(11)
        if len(tag) < 11 or tag[0] & 0x1F != 18:  # a script data tag
            return None
        body = fh.read(min(int.from_bytes(tag[1:4], "big"), _FLV_METADATA_BYTES))
    finally:
        fh.seek(where)
    if not body.startswith(b"\x02\x00\x0aonMetaData"):
        return None
    at = body.find(b"\x00\x08duration\x00")  # the key, then an AMF0 number (a big-endian double)
    if at < 0 or at + 19 > len(body):
        return None
    seconds = struct.unpack(">d", body[at + 11 : at + 19])[0]
    return seconds if math.isfinite(seconds) and seconds > 0 else None


# Matroska/WebM, MP4, MPEG-TS and Ogg stamp their packets (Ogg its pages) with their time, and a
# recorder that writes nothing while the sender is silent (WebRTC's discontinuous transmission, a
# muted track) leaves a gap between one packet's end and the next one's time. The samples were
# taken back to back (frame.pts dropped, _read_pyav), so a 3 s pause between two talkers vanished
# (7.9 s decoded to 4.9 s in each), the second one's turns reported 3 s early. Gaps from
# _TIMESTAMP_GAP_S[0] to [1] are decoded as the silence they are; a longer jump (files joined, a
# clock reset) is left as it was, and so is a step back. An Ogg that libsndfile reads is read
# again by FFmpeg where it falls short of its length (_SHORT_READ)
_GAP_FILLED_FORMATS = ("matroska", "mov", "mpegts", "ogg")
_TIMESTAMP_GAP_S = (0.1, 60.0)


class _Timeline:
    """Where a stream's next frame should begin, from the frames' own timestamps: how much of
    the stream's time is missing before each frame (:data:`_TIMESTAMP_GAP_S`)."""

    def __init__(self) -> None:
        self.next_s: float | None = None

    def gap(self, frame) -> float:
        """Seconds missing before ``frame`` (0 where none, or where its time is unknown)."""
        if frame.pts is None or frame.time_base is None or not frame.sample_rate:
            self.next_s = None
            return 0.0
        start = float(frame.pts * frame.time_base)
        missing = 0.0 if self.next_s is None else start - self.next_s
        self.next_s = start + frame.samples / frame.sample_rate
        least, most = _TIMESTAMP_GAP_S
        return missing if least <= missing <= most else 0.0


# FFmpeg's own AMR decoders refuse the frames discontinuous transmission (DTX) writes in a
# speaker's pauses, comfort noise (SID) and NO_DATA ("dtx mode" not implemented, "corrupt
# bitstream"), so each was skipped as a damaged packet and the pauses vanished from the result: a
# call of 1 s of speech, 3 s of DTX pause and 1 s of speech (5.02 s) decoded to 2.18 s, its second
# turn reported at 1.1 s instead of 4 s, and the length fell short of what the header check
# counted (shared.audio_limits.amr_length). The 3GPP reference decoders FFmpeg wraps
# (libopencore-amr, in PyAV's wheels) decode them as the comfort noise they describe, 20 ms each
_DTX_DECODERS = {"amrnb": "libopencore_amrnb", "amrwb": "libopencore_amrwb"}


def _own_decoder(stream) -> Any | None:
    """A decoder of its own for ``stream`` where FFmpeg's default one drops frames the stream is
    made of (:data:`_DTX_DECODERS`), None to decode with the stream's own (or where this build of
    FFmpeg lacks the other)."""
    import av

    # no codec context at all where FFmpeg has no decoder for the stream (an MP4 cut off before
    # its sample description): decoded, as before, into no samples (415)
    name = _DTX_DECODERS.get(getattr(stream.codec_context, "name", None) or "")
    if name is None:
        return None
    try:
        return av.CodecContext.create(name, "r")
    except (av.FFmpegError, ValueError):  # a build without libopencore-amr
        return None


def _read_pyav(fh: BinaryIO, max_duration: float) -> _Collector:
    import av

    check_containers(fh)  # before FFmpeg indexes, converts or tables what their headers declare
    check_riff_chunks(fh)  # before FFmpeg walks them one seek at a time
    # FFmpeg reads the comments of every link of a chain as it decodes it (check_containers
    # checked the first link's, as the header check did)
    check_ogg_comments(fh, every_link=True)
    # Not sandboxed: the worker checked this file's header first (check_audio_limits, in
    # worker/tasks.py), and FFmpeg's reading of it ran in a child held to the header check's CPU,
    # memory and time limits (shared/probe_sandbox.py): a file that passed was readable within
    # them, and this open reads the same header. Decoding is bounded by the job's time limit.
    try:
        # container demuxers only (shared.audio_limits.DEMUXERS): left to autodetect, FFmpeg
        # followed a concat list in an upload to a file under the worker's working directory
        # and decoded that instead, and an SDP description held the worker 20 s on a UDP port
        # from behind its ID3 tags, as the header check opened it (ffmpeg_input)
        container = av.open(ffmpeg_input(fh), mode="r", metadata_errors="ignore", **pyav_options())
    except (av.FFmpegError, ValueError, OSError) as exc:
        # FFmpeg answers ENOMEM for a container of more than MAX_STREAMS streams
        why = f": more than {MAX_STREAMS} streams?" if isinstance(exc, MemoryError) else ""
        raise NotAudioError.unreadable(f"{exc.__class__.__name__}{why}") from exc
    with container:
        if not container.streams.audio:
            raise NotAudioError.no_audio_stream()
        stream = container.streams.audio[0]
        check_channels(stream_channels(stream))
        for other in container.streams:
            if other.index != stream.index:
                # not read at all where the demuxer can skip it (an MP4's other tracks: half
                # the time of demuxing one track of many)
                try:
                    other.discard = av.stream.Discard.all
                except (AttributeError, ValueError, TypeError):  # a PyAV without it
                    break
        declared = declared_duration(container, stream)
        binding = container.format.name.split(",")[0] in _DECLARED_FORMATS
        if container.format.name == "mp3" and declared:
            # an MP3's length is FFmpeg's estimate from its bitrate, unless its first frame
            # holds a Xing/Info header that FFmpeg believed (its byte count is the file's: not
            # two files joined): that one is a count the encoder wrote
            counted = _xing_seconds(fh)
            binding = counted is not None and abs(counted - declared) <= 0.01 * counted + 0.1
        elif container.format.name == "flv" and declared:
            # an FLV's length is its onMetaData's duration, which its writer fills in, where it
            # has one; else FFmpeg's guess from the last tag's timestamp (a live recording's
            # timestamps may start again from 0). A 1 s duration over 300 s of AAC decoded whole,
            # as a WavPack's first block did (_DECLARED_FORMATS)
            metadata = _flv_duration(fh)
            binding = metadata is not None and abs(metadata - declared) <= 0.01 * metadata + 0.1
        collected = _Collector(max_duration, declared or None, binding=binding)
        collected.tracks = len(container.streams.audio)
        if binding and declared == 0:  # declares nothing to decode: held to the slack alone
            collected.ceiling, collected.expected_s = int(DECLARED_SLACK[1] * SAMPLE_RATE), 0.0

        def packets():
            # PyAV (18.1) flushes at the end of the file by the streams the container has then,
            # with a table of those it had when demuxing began: a stream that appeared mid-file
            # (an FLV's first video or data tag, a new PID in an MPEG-TS) raised IndexError there,
            # after every packet of this stream and its flush, and the job failed as an internal
            # error (500). The decode is whole by then
            demuxed = container.demux(stream)
            while True:
                try:
                    packet = next(demuxed)
                except (StopIteration, IndexError):
                    return
                yield packet

        decoder = _own_decoder(stream)

        def frames():
            # packet by packet: a corrupt packet (a damaged frame of an MP3, a bad AAC block) is
            # skipped, as FFmpeg's own tools do, instead of ending the decode there
            for packet in packets():
                try:
                    decoded = packet.decode() if decoder is None else decoder.decode(packet)
                except (av.FFmpegError, ValueError):
                    continue
                yield from decoded

        # Decoded frames are gathered into blocks of about 10 s: an AAC frame is 1024 samples,
        # so an hour is 155k frames, and resampling and collecting them one by one took 8 of the
        # hour's 10 s of decoding (1.9 s of it FFmpeg's decoder). Each block is converted to
        # planar float at its own rate, down-mixed to the mean of its channels as libsndfile's
        # files are (_downmix), and resampled as one stream (_StreamResampler). libswresample's
        # own down-mix is not the mean: it adds the channels at -3 dB each, so a stereo file came
        # out 3 dB louder than the same file through libsndfile, and clipped where loud.
        fifo = None
        converter = None
        to_16k: _StreamResampler | None = None
        block = 0
        packed = 0  # channels of an interleaved conversion, 0 for planar

        def emit(converted: list) -> None:
            for out in converted:
                data = out.to_ndarray()
                mono = _downmix(data.reshape(-1, packed) if packed else data.T)
                if to_16k is None:
                    collected.add(mono)
                else:
                    to_16k.feed(mono)

        def drain(final: bool) -> None:
            while fifo is not None and (fifo.samples >= block or (final and fifo.samples)):
                emit(converter.resample(fifo.read(block, partial=final)))

        def finish() -> None:
            if converter is not None:
                drain(final=True)
                emit(converter.resample(None))
            if to_16k is not None:
                to_16k.flush()

        setup: tuple | None = None
        changes = 0
        timeline = _Timeline() if container.format.name.split(",")[0] in _GAP_FILLED_FORMATS else None
        try:
            for frame in frames():
                _check_sample_rate(frame.sample_rate)
                # PyAV's resampler (and a FIFO) is fixed to its first frame's rate/layout/format
                # and raises ValueError on any other; a stream may change them (concatenated
                # files, or a corrupt AAC header), so drain the old ones and start new ones
                params = (frame.sample_rate, frame.layout.name, frame.format.name)
                if params != setup:
                    changes += setup is not None
                    if changes > _MAX_FORMAT_CHANGES:
                        raise AudioDecodeError(f"audio stream changes its sample rate, channels or sample format "
                                               f"more than {_MAX_FORMAT_CHANGES} times")
                    finish()
                    rate = frame.sample_rate
                    channels = max(1, len(frame.layout.channels))
                    check_channels(channels)  # a layout the header did not declare
                    collected.hold_to_work(rate, channels)
                    # PyAV (18.1) counts a planar frame of 8 or more channels one plane too many,
                    # past AVFrame's 8 data pointers, and to_ndarray read through it: a 7.1 PCM
                    # Matroska killed the process (SIGSEGV). Those are converted interleaved (one
                    # plane; the same floats, down-mixed in the same order), fewer planar as before
                    packed = channels if channels >= _PACKED_FROM else 0
                    converter = av.AudioResampler(format="flt" if packed else "fltp", layout=frame.layout, rate=rate)
                    # a stream of its own from where the collector stands
                    to_16k = None if rate == SAMPLE_RATE else _StreamResampler(rate, collected)
                    fifo = av.AudioFifo()
                    block = max(1, min(10 * rate, _BLOCK_SAMPLES // channels))
                    setup = params
                missing = timeline.gap(frame) if timeline is not None else 0.0
                if missing:
                    # what came before goes on, then the silence the recorder left out, added as
                    # mono at the stream's rate a second at a time (never from the frame itself:
                    # to_ndarray of a planar frame of 8 or more channels reads past its planes)
                    drain(final=True)
                    left = round(missing * rate)
                    while left > 0:
                        n = min(left, rate)
                        if to_16k is None:
                            collected.skip(n)
                        else:
                            to_16k.feed(np.zeros(n, dtype=np.float32))
                        left -= n
                # the FIFO checks that timestamps run on without a gap; a damaged stream's need
                # not, and only the samples matter here
                frame.pts = None
                fifo.write(frame)
                drain(final=False)
            finish()
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

    A recording of several channels whose mean is silent is decoded again, its first channel
    alone: channels that cancel in their mean (a microphone wired with one leg of a balanced
    cable reversed, a mono voice written to left and right in opposite polarity) made speech on
    every channel a mean of exact zeros, or of a lossy codec's residue under -80 dBFS (MP3, AAC,
    Opus alike), refused as "audio is silent" (422). A file silent on every channel is decoded
    twice before that refusal.
    """
    start = source.tell() if hasattr(source, "seek") else 0
    try:
        return _load_audio(source, max_duration=max_duration, min_duration=min_duration,
                           reject_silence=reject_silence)
    except InputError as silent:
        if getattr(silent, _SILENT_MEAN_OF, 1) < 2 or _FIRST_CHANNEL.get():
            raise
        # its traceback holds the first decode's frame, and that the whole (silent) result
        silent.__traceback__ = None
        if hasattr(source, "seek"):
            source.seek(start)  # type: ignore[union-attr]
        token = _FIRST_CHANNEL.set(True)
        try:
            return _load_audio(source, max_duration=max_duration, min_duration=min_duration,
                               reject_silence=reject_silence)
        except InputError as again:
            if getattr(again, _SILENT_MEAN_OF, 0):
                raise silent from None  # silent on its first channel too: the first refusal
            raise
        finally:
            _FIRST_CHANNEL.reset(token)


def load_channel(source: AudioSource, channel: int, *, max_duration: float = 4 * 3600.0,
                 min_duration: float = 0.5) -> Audio:
    """One channel of ``source`` alone, decoded as :func:`load_audio` decodes the mean (a silent
    channel is not refused: the other may hold the speech)."""
    token = _CHANNEL.set(channel)
    try:
        return _load_audio(source, max_duration=max_duration, min_duration=min_duration, reject_silence=False)
    finally:
        _CHANNEL.reset(token)


def _load_audio(source: AudioSource, *, max_duration: float, min_duration: float, reject_silence: bool) -> Audio:
    owned = isinstance(source, (bytes, bytearray, str, os.PathLike))
    fh = _open(source)
    try:
        head = fh.read(16)
        if not head:
            raise AudioDecodeError("file is empty")
        fh.seek(0)
        collected = _read_soundfile(fh, max_duration, _reopener(source))
        if collected is None:
            fh.seek(0)
            try:
                collected = _read_pyav(fh, max_duration)
            except AudioDecodeError:
                # an Ogg whose links change codec, rate or layout, which FFmpeg cannot follow:
                # libsndfile decodes it link by link (anything else libsndfile refuses again)
                fh.seek(0)
                collected = _read_ogg_links(fh, max_duration)
                if collected is None:
                    fh.seek(0)
                    collected = _read_soundfile(fh, max_duration, _reopener(source), chains=False)
                if collected is None:
                    raise
        elif collected.expected_s is not None and collected.size < _SHORT_READ * collected.expected_s * SAMPLE_RATE:
            # libsndfile gives up at the first stretch of damage it cannot get past and reports
            # the end of the file (100 damaged bytes in a 10 min MP3 left 66 s of it, silently).
            # FFmpeg skips damaged packets; the longer decode is kept
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
        raise silent_audio(collected.tracks, collected.channels)
    audio = validate_samples(samples, min_duration=min_duration, max_duration=max_duration,
                             reject_silence=reject_silence, tracks=collected.tracks, channels=collected.channels)
    return replace(audio, source_rate=collected.lowest_rate)


# the attribute of silent_audio's refusal that says how many channels the silent mean was of
_SILENT_MEAN_OF = "silent_mean_of"


def silent_audio(tracks: int = 1, channels: int = 1) -> InputError:
    """The refusal of a recording without sound (422). Of a container of several audio tracks
    only the first is decoded (the header check reads the first too): a recorder's silent first
    track (OBS's desktop audio, a muted microphone) beside the speech in the second was refused
    as "audio is silent" without a word of the other tracks. ``channels``: of the mean found
    silent (load_audio then tries the first channel alone)."""
    if tracks > 1:
        error = InputError(f"audio is silent: the first of {tracks} audio tracks holds no sound; "
                           "only the first audio track is analysed")
    else:
        error = InputError("audio is silent: no signal to analyse")
    setattr(error, _SILENT_MEAN_OF, channels)
    return error


def validate_samples(
    samples: np.ndarray, *, min_duration: float, max_duration: float, reject_silence: bool = True, tracks: int = 1,
    channels: int = 1,
) -> Audio:
    """Checks of the decoded result as a whole: its length and its level. Each sample was
    checked finite and clipped to full scale as it was collected (``_Collector.add``).
    ``tracks``: the audio tracks of the file the samples are the first of (the refusal says so);
    ``channels``: what the samples are the mean of (silent_audio)."""
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
            raise silent_audio(tracks, channels)
    return Audio(samples, channels=max(1, channels))
