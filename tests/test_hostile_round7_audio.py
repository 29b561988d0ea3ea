"""A seventh round of hostile audio: the work of decoding a file, which its length does not say.

Every channel is decoded at its own rate before the down-mix to 16 kHz mono, so a second of audio
costs the decoder rate x channels samples: 8-channel 384 kHz FLAC took 49 ms of CPU per second of
audio against 2.9 ms for 48 kHz stereo, and a day of it (small where it is silent) passed the
24 h duration limit and held a worker's CPU for 70 min. A file may now cost what the limit's
length of 8 tracks at 48 kHz costs (shared.audio_limits.WORK_SAMPLES_PER_S): refused from its
header (413) at submit and by the worker, and held to it while decoding where the header declares
no length. A recording of 8 tracks at 48 kHz or less is held to its length alone, as before.
"""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf

from engine.audio import load_audio
from shared.audio_limits import check_audio_limits
from shared.errors import AudioTooLongError

ERROR_KEYS = {"detail", "error_type", "timestamp"}


def _mka(rate: int, layout: str, seconds: float) -> bytes:
    """PCM in Matroska (PyAV's decoder), noise at -20 dBFS."""
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout=layout)
        channels = stream.codec_context.channels
        n = rate // 10
        for i in range(int(seconds * 10)):
            data = (rng.standard_normal((1, n * channels)) * 3000).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(data, format="s16", layout=layout)
            frame.sample_rate, frame.pts = rate, i * n
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _flac_of_unknown_length(rate: int, channels: int, seconds: float) -> bytes:
    """FLAC whose STREAMINFO counts no samples: what an encoder writing to a pipe leaves (libsndfile
    then reports a length it does not know, and the decoder streams the file)."""
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    sf.write(buf, (rng.standard_normal((int(rate * seconds), channels)) * 0.1).astype(np.float32), rate,
             format="FLAC", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first
    # STREAMINFO: block sizes (4 bytes), frame sizes (6), then 64 bits of rate (20), channels (3),
    # bits per sample (5) and total samples (36)
    packed = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)
    data[18:26] = packed.to_bytes(8, "big")
    return bytes(data)


def test_a_file_more_to_decode_than_its_length_says_is_refused_from_its_header() -> None:
    wide = _mka(384_000, "7.1", 2.0)  # 8 channels at 384 kHz: 8 times 8 x 48 kHz
    with pytest.raises(AudioTooLongError, match="8 channels at 384000 Hz") as refused:
        check_audio_limits(io.BytesIO(wide), max_duration=15)
    assert refused.value.status_code == 413
    assert check_audio_limits(io.BytesIO(wide), max_duration=17) is not None  # 16 s of work


def test_eight_tracks_at_48_khz_are_held_to_their_length_alone() -> None:
    """The widest common recording (a multitrack podcast or meeting recorder) is not refused for
    its width: 2 s of it passes a 2.5 s limit, and decodes."""
    tracks = _mka(48_000, "7.1", 2.0)
    info = check_audio_limits(io.BytesIO(tracks), max_duration=2.5)
    assert info is not None and info.channels == 8
    assert load_audio(tracks, max_duration=2.5).duration == pytest.approx(2.0, abs=0.01)


def test_the_decoder_holds_a_wide_file_to_the_work_of_the_limit() -> None:
    """The decoder is held to the same work while it decodes (FFmpeg's path): a file whose header
    declared no length would not have met the header check."""
    wide = _mka(384_000, "7.1", 2.0)
    with pytest.raises(AudioTooLongError, match="more to decode"):
        load_audio(wide, max_duration=12)  # 16 s of work, past the decoder's 1 s of slack
    assert load_audio(wide, max_duration=17).duration == pytest.approx(2.0, abs=0.01)


def test_a_wide_flac_of_unknown_length_is_held_to_the_work_of_the_limit() -> None:
    """libsndfile's path, with a STREAMINFO that counts no samples: nothing in the header to check."""
    wide = _flac_of_unknown_length(384_000, 8, 2.0)
    assert check_audio_limits(io.BytesIO(wide), max_duration=15).duration is None  # nothing declared
    with pytest.raises(AudioTooLongError, match="more to decode"):
        load_audio(wide, max_duration=12)  # 16 s of work, past the decoder's 1 s of slack
    assert load_audio(wide, max_duration=17).duration == pytest.approx(2.0, abs=0.01)


def test_the_api_refuses_a_file_too_costly_to_decode_at_submit(client) -> None:
    """A synchronous call's limit is 30 min: 4 min of 8 channels at 384 kHz is 32 min of work.
    The FLAC's STREAMINFO declares the 4 min; its samples are not all there, and need not be: the
    answer comes from the header."""
    rng = np.random.default_rng(2)
    buf = io.BytesIO()
    sf.write(buf, (rng.standard_normal((3840, 8)) * 0.1).astype(np.float32), 384_000, format="FLAC",
             subtype="PCM_16")
    data = bytearray(buf.getvalue())
    packed = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)
    data[18:26] = (packed | 384_000 * 240).to_bytes(8, "big")
    r = client.post("/diarize", files={"file": ("wide.flac", bytes(data), "audio/flac")})
    assert r.status_code == 413, r.text
    assert set(r.json()) == ERROR_KEYS and "8 channels at 384000 Hz" in r.json()["detail"], r.json()
