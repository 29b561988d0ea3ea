"""Hostile audio, round 16: headers that declare a length FFmpeg takes at its word, of formats
earlier rounds did not hold to it.

- A WAV of a codec libsndfile does not read (TrueSpeech, GSM in an odd layout, ...) goes to
  FFmpeg, whose length for it is the data chunk's size over the header's average byte rate, a
  field anyone can write. A 4 MB WAV of TrueSpeech packets whose byte rate said 4 MB/s passed the
  header check (API and worker) as 1.0 s and decoded to 3750 s (2 s of CPU, 250 MB); with the
  upload limit's 1 GB it decodes to the 24 h limit (2.7 GB of float16 in the worker) under a job
  time limit of 601 s for its "1 s", and an enrolment's 20 such files counted 20 s in its
  duration budget. A synchronous request decoded 30 min of it before its 413.
- An AIFF-C of a codec libsndfile does not read (MACE 3:1 and 6:1, QCELP) the same with its
  COMM chunk's frame count: 2 MB said 1 s and decoded to 750 s, 1500 s and 1143 s.

- An AVI's audio stream header (strh dwLength) and an ASF's (WMA) play duration the same: 70 s
  of MP3 or WMA counted as 1 s passed as 1 s and decoded whole.

These are now held to their declared length as MP4, Matroska, WavPack and FLV are (rounds 5 and
10): refused (415) as soon as they decode past twice that and a minute; a count of 0 (a writer
that could not go back to fill it in) is no length. Honest files of the same codecs decode to
their end.

- A raw AC-3 or E-AC-3 stream has no header: FFmpeg estimates its length from its first frames'
  bitrate, so one second at 640 kbps before 120 s at 32 kbps passed as 12 s (E-AC-3: 7 s) and
  decoded to 121 s. Its frames are counted now, as an ADTS stream's are (adts_length).
"""

from __future__ import annotations

import io
import math
import struct

import numpy as np
import pytest

from engine.audio import load_audio
from evaluation.encoding import encode
from shared.audio_limits import check_audio_limits, dolby_length
from shared.errors import AudioDecodeError, AudioTooLongError
from tests.conftest import failed_job_error

# random bytes decode as TrueSpeech (32-byte packets of 240 samples at 8 kHz) and as MACE: no
# encoder for either is at hand, and the decoders take any bits
_PAYLOAD = np.random.default_rng(16).integers(0, 256, 400_000, dtype=np.uint8).tobytes()


def _wav(byte_rate: int, data: bytes = _PAYLOAD) -> bytes:
    """A mono 8 kHz WAV of TrueSpeech (format tag 0x22), declaring ``byte_rate`` bytes a second."""
    fmt = struct.pack("<HHIIHH", 0x22, 1, 8000, byte_rate, 32, 1)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _ext80(value: float) -> bytes:
    """An IEEE 754 80-bit extended float, as AIFF's COMM chunk holds its sample rate."""
    exponent = int(math.floor(math.log2(value)))
    return struct.pack(">HQ", 16383 + exponent, int(value / 2**exponent * 2**63))


def _aifc(frames: int, codec: bytes = b"MAC6", data: bytes = _PAYLOAD) -> bytes:
    """A mono 8 kHz AIFF-C of ``codec`` whose COMM chunk counts ``frames``."""
    comm = struct.pack(">hIh", 1, frames, 16) + _ext80(8000.0) + codec + b"\x00\x00"
    ssnd = struct.pack(">II", 0, 0) + data
    body = (b"AIFC" + b"FVER" + struct.pack(">II", 4, 0xA2805140) + b"COMM" + struct.pack(">I", len(comm)) + comm
            + b"SSND" + struct.pack(">I", len(ssnd)) + ssnd)
    return b"FORM" + struct.pack(">I", len(body)) + body


# TrueSpeech's own rate: 32 bytes per 30 ms; 400 KB of it is 375 s
_TRUESPEECH_BYTE_RATE = 1067


def test_a_wav_whose_byte_rate_understates_its_length_is_refused_as_it_decodes() -> None:
    """The header check reads 1 s of the forged WAV; its 375 s are refused past 2 x 1 s + 60 s
    (before: decoded whole, 375 s). The honest file's length is what it decodes to."""
    forged = _wav(len(_PAYLOAD))
    assert check_audio_limits(io.BytesIO(forged), max_duration=3600.0).duration == pytest.approx(1.0)
    with pytest.raises(AudioDecodeError, match="decodes to more than its header declares") as refused:
        load_audio(forged, reject_silence=False)
    assert refused.value.status_code == 415
    honest = _wav(_TRUESPEECH_BYTE_RATE)
    declared = check_audio_limits(io.BytesIO(honest), max_duration=3600.0).duration
    assert declared == pytest.approx(375.0, rel=0.01)
    assert load_audio(honest, reject_silence=False).duration == pytest.approx(declared, rel=0.01)


def test_an_aifc_whose_frame_count_understates_its_length_is_refused_as_it_decodes() -> None:
    """MACE 6:1 in AIFF-C: 400 KB is 2.4 M samples (300 s at 8 kHz); a COMM chunk counting 1333
    frames said 1 s and the file decoded to 300 s. Refused now; the honest count decodes whole."""
    forged = _aifc(1333)
    assert check_audio_limits(io.BytesIO(forged), max_duration=3600.0).duration == pytest.approx(1.0, abs=0.01)
    with pytest.raises(AudioDecodeError, match="decodes to more than its header declares"):
        load_audio(forged, reject_silence=False)
    honest = _aifc(len(_PAYLOAD))  # MACE 6:1: a byte a frame of 6 samples
    declared = check_audio_limits(io.BytesIO(honest), max_duration=3600.0).duration
    assert declared == pytest.approx(300.0, rel=0.01)
    assert load_audio(honest, reject_silence=False).duration == pytest.approx(declared, rel=0.01)


def test_a_header_counting_no_frames_is_a_length_unknown_not_0_s() -> None:
    """A COMM chunk counting 0 frames over 300 s of MACE read as 0.0 s at the header check: nothing
    in a job's duration budget, the floor of its time limit, and held to 0 s the decoder would
    refuse it after a minute. A writer that could not go back to count (a pipe) leaves 0: the
    length is unknown (the job gets the limit's time) and the file decodes to its end."""
    unsized = _aifc(0)
    assert check_audio_limits(io.BytesIO(unsized), max_duration=3600.0).duration is None
    assert load_audio(unsized, reject_silence=False).duration == pytest.approx(300.0, rel=0.01)


def _avi(seconds: float, *, count_as: float | None = None) -> bytes:
    """``seconds`` of MP3 in AVI as FFmpeg writes it; its audio stream header's length (strh
    dwLength, in its own blocks) rewritten to count ``count_as`` seconds where given."""
    t = np.arange(int(seconds * 16000)) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    data = bytearray(encode(tone, 16000, container="avi", codec="mp3"))
    at = data.find(b"strh")
    assert data[at + 8 : at + 12] == b"auds"
    length = struct.unpack("<I", data[at + 40 : at + 44])[0]
    if count_as is not None:
        data[at + 40 : at + 44] = struct.pack("<I", max(1, round(length * count_as / seconds)))
    return bytes(data)


def test_an_avi_whose_stream_header_understates_its_length_is_refused_as_it_decodes() -> None:
    """70 s of MP3 in AVI whose strh counted 1 s: 1 s at the header check, 70 s decoded (an
    hour's as cheaply). Refused now past 2 x 1 s + 60 s; the honest file decodes whole."""
    forged = _avi(70.0, count_as=1.0)
    assert check_audio_limits(io.BytesIO(forged), max_duration=3600.0).duration == pytest.approx(1.0, abs=0.1)
    with pytest.raises(AudioDecodeError, match="decodes to more than its header declares"):
        load_audio(forged)
    assert load_audio(_avi(70.0)).duration == pytest.approx(70.0, abs=0.2)


# ASF's File Properties Object: its GUID, then size, file id, file size, creation date and packet
# count before the play and send durations (100 ns units; play includes the preroll, in ms)
_ASF_FILE_PROPERTIES = bytes.fromhex("A1DCAB8C47A9CF118EE400C00C205365")


def _wma(seconds: float, *, count_as: float | None = None) -> bytes:
    """``seconds`` of WMA (v2) in ASF as FFmpeg writes it; its File Properties' play and send
    durations rewritten to ``count_as`` seconds where given."""
    t = np.arange(int(seconds * 16000)) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    data = bytearray(encode(tone, 16000, container="asf", codec="wmav2", bit_rate=32000))
    at = data.find(_ASF_FILE_PROPERTIES) + 16 + 8 + 16 + 8 + 8 + 8
    preroll_ms = struct.unpack("<Q", data[at + 16 : at + 24])[0]
    if count_as is not None:
        data[at : at + 16] = struct.pack("<QQ", int(count_as * 1e7) + preroll_ms * 10_000, int(count_as * 1e7))
    return bytes(data)


def test_a_wma_whose_file_properties_understate_its_length_is_refused_as_it_decodes() -> None:
    """70 s of WMA whose ASF header said 1 s: 1 s at the header check, 70 s decoded. Refused now
    past 2 x 1 s + 60 s; the honest file decodes whole."""
    forged = _wma(70.0, count_as=1.0)
    assert check_audio_limits(io.BytesIO(forged), max_duration=3600.0).duration == pytest.approx(1.0, abs=0.1)
    with pytest.raises(AudioDecodeError, match="decodes to more than its header declares"):
        load_audio(forged)
    assert load_audio(_wma(70.0)).duration == pytest.approx(70.0, abs=0.2)


def _dolby(container: str, seconds: float, bit_rate: int) -> bytes:
    """``seconds`` of a tone as a raw AC-3 or E-AC-3 stream (``container`` "ac3"/"eac3") at 48 kHz."""
    t = np.arange(int(seconds * 48000)) / 48000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return encode(tone, 48000, container=container, codec=container, bit_rate=bit_rate)


@pytest.mark.parametrize("kind", ["ac3", "eac3"])
def test_a_raw_dolby_streams_length_is_counted_not_estimated_from_its_first_frames(kind: str) -> None:
    """A raw AC-3 or E-AC-3 stream has no header of its own: FFmpeg estimates its length from its
    first frames' bitrate, as it does an ADTS stream's. One second at 640 kbps and 120 s at 32 kbps
    behind it (a stream joined with cat, or frames an uploader chose) read as 7 s (AC-3) and 5 s
    (E-AC-3) at the header check and decoded to 121 s (1201 s read as 101 s and 61 s): the job's
    duration budget and time limit went by the estimate. The frames are counted now."""
    joined = _dolby(kind, 1.0, 640_000) + _dolby(kind, 120.0, 32_000)
    declared = check_audio_limits(io.BytesIO(joined), max_duration=3600.0)
    decoded = load_audio(joined).duration
    assert decoded == pytest.approx(121.0, abs=0.2)
    assert declared.duration == pytest.approx(decoded, abs=0.2)
    # past the caller's limit the count stops, and says so
    with pytest.raises(AudioTooLongError, match="over 60 s"):
        check_audio_limits(io.BytesIO(joined), max_duration=60.0)
    # what is not a frame among them (damage, a tag): the length is unknown, as FFmpeg resyncs
    damaged = joined[:50_000] + b"\x00" * 999 + joined[50_000:]
    assert check_audio_limits(io.BytesIO(damaged), max_duration=3600.0).duration is None


def test_dolby_frames_that_add_no_time_give_no_length_not_0_s() -> None:
    """E-AC-3 frames all marked as a dependent substream (more channels of a time an independent
    frame carries) add no time to the count: their length is unknown, not 0 s (nothing in a job's
    budget, the floor of its time limit); a last frame cut short is left out, as FFmpeg leaves it."""
    stream = bytearray(_dolby("eac3", 10.0, 96_000))
    assert dolby_length(io.BytesIO(bytes(stream))).seconds == pytest.approx(10.0, abs=0.05)
    assert dolby_length(io.BytesIO(bytes(stream[:-100]))).seconds == pytest.approx(10.0, abs=0.05)
    at = 0
    while at + 6 <= len(stream):
        size = 2 * ((((stream[at + 2] & 7) << 8) | stream[at + 3]) + 1)
        stream[at + 2] = (stream[at + 2] & 0x3F) | 0x40  # strmtyp 1: dependent
        at += size
    assert dolby_length(io.BytesIO(bytes(stream))).seconds is None


def test_a_forged_wav_fails_its_job_with_a_415(client) -> None:
    """Through the API (202: its header says 1 s) and the session's real worker: the job fails in
    the documented shape, a 415, rather than analysing 375 s under the time limit of 1 s."""
    error = failed_job_error(client, "/jobs/embedding", {"file": ("forged.wav", _wav(len(_PAYLOAD)), "audio/wav")})
    assert error["status_code"] == 415, error
    assert "decodes to more than its header declares" in error["detail"], error


# --- FLAC files joined with cat ---------------------------------------------------------------------

def _flac(seconds: float, rate: int, channels: int = 1) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.stack([tone] * channels, axis=1), rate, format="FLAC")
    return buf.getvalue()


@pytest.mark.parametrize("second", [(16000, 1), (44100, 2)], ids=["same", "other_rate_and_channels"])
def test_flac_files_joined_with_cat_are_decoded_to_the_end(second: tuple[int, int]) -> None:
    """libsndfile reads a FLAC to its STREAMINFO's count and stops: two recordings of 3 s and 5 s
    joined with cat were taken for 3 s by the header check and analysed as their first 3 s
    without a word (FFmpeg decodes on, but not across a change of rate or channels: 8.9 s). Each
    is decoded by libsndfile now, and the header check sums their counts."""
    joined = _flac(3.0, 16000) + _flac(5.0, *second)
    assert check_audio_limits(io.BytesIO(joined), max_duration=3600.0).duration == pytest.approx(8.0)
    assert load_audio(joined).duration == pytest.approx(8.0, abs=0.05)
    with pytest.raises(AudioTooLongError):
        check_audio_limits(io.BytesIO(joined), max_duration=5.0)
    # one FLAC alone keeps its length, read by libsndfile
    alone = _flac(3.0, 16000)
    assert check_audio_limits(io.BytesIO(alone), max_duration=3600.0).duration == pytest.approx(3.0)
    assert load_audio(alone).duration == pytest.approx(3.0)


def test_flacs_joined_where_one_does_not_count_its_samples_have_no_length() -> None:
    """A FLAC an encoder wrote to a pipe counts 0 samples (unknown): joined behind another, the sum
    is unknown too, and the decoder reads both to their end."""
    data = bytearray(_flac(5.0, 16000))
    data[21] &= 0xF0  # STREAMINFO's 36-bit total samples and its MD5: 0, as such an encoder leaves them
    data[22:42] = bytes(20)
    joined = _flac(3.0, 16000) + bytes(data)
    assert check_audio_limits(io.BytesIO(joined), max_duration=3600.0).duration is None
    assert load_audio(joined).duration == pytest.approx(8.0, abs=0.05)
