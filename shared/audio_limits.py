"""What a container header says about an upload, read without decoding a sample.

The API checks it before a job is queued and the worker again before it decodes: both refuse
what would tie a worker up for hours (too long, a rate so low that resampling multiplies it).
No torch: soundfile and PyAV read headers only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO, Union

from shared.errors import AudioDecodeError, AudioTooLongError

# below this no speech is left (telephony is 8 kHz); a 1 Hz WAV of 28 KB is 3.9 h once resampled
MIN_SAMPLE_RATE = 4_000
# the highest rate real recorders use: anything above is a forged header, which the worker's
# decoder refuses too (engine/audio.py); refused here, the client hears it at submit
MAX_SAMPLE_RATE = 768_000


# libsndfile's frame count for a stream of unknown length is SF_COUNT_MAX (2**63 - 1); no real
# header declares anywhere near 2**62 frames (FLAC's own field holds 36 bits). The engine's
# decoder reads such a stream block by block (engine/audio.py)
UNKNOWN_FRAMES = 1 << 62


# The FFmpeg demuxers asked to read a header: containers that hold their own audio. FFmpeg's
# autodetection also picks demuxers that open other things named inside the file: an SDP
# description (``v=0 ... m=audio 5004 RTP/AVP``) made the API bind UDP ports and wait 10 s for
# RTP packets per upload, a concat list (``ffconcat version 1.0 / file sub/x.wav``) read a file
# relative to the process's working directory, and HLS or DASH playlists name URLs. None of
# them is a recording. A format missing here is not refused at submit (its header goes unread),
# and the worker's decoder, which keeps to the same list, refuses it (415) unless libsndfile
# reads it. ``format_whitelist`` takes the demuxers' short names.
DEMUXERS = (
    "aac", "ac3", "aiff", "amr", "amrnb", "amrwb", "ape", "asf", "au", "avi", "caf", "dsf", "dts", "dtshd", "eac3",
    "flac", "flv", "gsm", "ircam", "loas", "matroska", "mlp", "mov", "mp3", "mpc", "mpc8", "mpeg", "mpegts",
    "nistsphere", "nut", "ogg", "oma", "qcp", "rm", "shn", "sox", "spdif", "tak", "truehd", "tta", "voc", "w64",
    "wav", "wv", "xwma",
)
# what av.open takes to keep to them (engine/audio.py's decoder may pass the same)
PYAV_OPTIONS = {"container_options": {"format_whitelist": ",".join(DEMUXERS)}}


@dataclass(frozen=True)
class AudioInfo:
    """What a container header declares, read without decoding a sample."""

    duration: float | None
    sample_rate: int | None


Source = Union[str, os.PathLike, BinaryIO]


def probe(source: Source) -> AudioInfo | None:
    """Duration and sample rate from the header (libsndfile, else FFmpeg); None if unreadable.

    ``source`` is a path or a seekable binary file (an upload as the API received it, read from
    its start and left there).
    """
    if hasattr(source, "read"):
        try:
            return _probe(source)
        finally:
            source.seek(0)
    return _probe(source)


def _probe(source: Source) -> AudioInfo | None:
    import soundfile as sf

    def rewind() -> None:
        if hasattr(source, "seek"):
            source.seek(0)

    try:
        rewind()
        with sf.SoundFile(source) as snd:
            rate = int(snd.samplerate)
            # a length the header does not give is libsndfile's SF_COUNT_MAX: a FLAC written to
            # a pipe (FFmpeg's "-f flac -") has 0 total samples in its STREAMINFO, and its 2.9 s
            # read as 576460752303424 s, refused as too long
            known = 0 <= snd.frames < UNKNOWN_FRAMES
            return AudioInfo(snd.frames / rate if rate > 0 and known else None, rate)
    except Exception:  # noqa: BLE001 - not a libsndfile format: ask FFmpeg
        pass
    import av

    try:
        rewind()
        with av.open(source if hasattr(source, "read") else str(source), mode="r", metadata_errors="ignore",
                     **PYAV_OPTIONS) as container:
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
    source: Source, *, max_duration: float, min_sample_rate: int = MIN_SAMPLE_RATE, hint: str = ""
) -> AudioInfo | None:
    """Refuse from the header alone what would tie a worker up for hours: too long, or a rate
    so low that resampling multiplies it (413 / 415); and a rate no recorder makes (415)."""
    info = probe(source)
    if info is None:
        return None
    if info.sample_rate is not None and info.sample_rate < min_sample_rate:
        raise AudioDecodeError(f"sample rate {info.sample_rate} Hz is below the minimum of {min_sample_rate} Hz")
    if info.sample_rate is not None and info.sample_rate > MAX_SAMPLE_RATE:
        raise AudioDecodeError(f"sample rate {info.sample_rate} Hz is above the maximum of {MAX_SAMPLE_RATE} Hz")
    if info.duration is not None and info.duration > max_duration:
        raise AudioTooLongError(f"audio is {info.duration:.0f} s long; the limit is {max_duration:.0f} s{hint}")
    return info


class DurationBudget:
    """The duration limit for a job's audio files together, as their headers declare them.

    An enrollment takes up to 20 files and a comparison two: each at the limit would tie a
    worker up for that many times the longest job one file may make."""

    def __init__(self, limit: float, hint: str = "") -> None:
        self.limit, self.hint, self.total = limit, hint, 0.0

    def add(self, info: AudioInfo | None) -> None:
        if info is None or info.duration is None:
            return  # a header without a length: the decoder holds the file to the limit itself
        self.total += info.duration
        if self.total > self.limit:
            raise AudioTooLongError(f"the job's audio files are {self.total:.0f} s long together; "
                                    f"the limit is {self.limit:.0f} s{self.hint}")
