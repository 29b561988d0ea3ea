"""Hostile audio, round 10: what a file's header declares against what it decodes to, in the
formats earlier rounds did not hold to it.

- WavPack: every block's header carries the file's total samples, and FFmpeg takes the first
  block's for the file's length but decodes every block there is. A 1.4 MB WavPack of 24 h of DC
  whose first block said 1 s passed the API as 1 s; a synchronous request decoded 30 min of it
  before its 413, and a job, its time limit 601 s for its "1 s", decoded all 24 h (21 s of CPU,
  5.1 GB of RSS as the buffer grew from 2 s) for the engine to run past that limit (504). It is
  now held to its declared length as MP4, Matroska and an MP3's Xing count are (round 5): refused
  (415) as soon as it decodes past twice that and a minute.

Files are crafted here with FFmpeg's encoders (PyAV), their headers rewritten. The decoder's cases
call it directly; the end-to-end ones go through the API and the session's real Celery worker
(tests/conftest.py), against the session's Redis.
"""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest

from engine.audio import load_audio
from shared.audio_limits import check_audio_limits, probe
from shared.errors import AudioDecodeError

from tests.conftest import wait_for_job

# the documented error body (an HTTP error's; a failed job's adds its status code)
ERROR_KEYS = {"detail", "error_type", "timestamp"}


def _tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _encode(samples: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    """Mono ``samples`` encoded by FFmpeg, in blocks of 10 s (evaluation.encoding's, which
    takes a whole recording in frames of 4608 samples: a minute of WavPack in 200 blocks)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        step = 10 * rate
        for start in range(0, len(samples), step):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + step].copy(), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


# --- WavPack: the first block's total samples ------------------------------------------------------

def _wavpack(seconds: float, total: int | None = None, rate: int = 16000) -> bytes:
    """``seconds`` of tone in WavPack, its first block's total samples (bytes 12-16 of the block
    header) rewritten to ``total`` where given (0xFFFFFFFF: what a writer to a pipe puts, no length)."""
    data = bytearray(_encode(_tone(seconds, rate), rate, "wv", "wavpack"))
    assert data[:4] == b"wvpk" and struct.unpack("<I", data[12:16])[0] == int(seconds * rate)
    if total is not None:
        data[12:16] = struct.pack("<I", total)
    return bytes(data)


def test_a_wavpack_decoding_far_past_its_first_blocks_length_is_refused() -> None:
    """70 s of WavPack whose first block says 1 s: the header check (the API's, the worker's
    time limit) takes 1 s, and the decoder went on to 70 s. Refused past 2 x 1 s + 60 s now;
    an honest file and one of unknown length (a writer to a pipe) decode to their end."""
    forged = _wavpack(70.0, total=16000)
    assert check_audio_limits(io.BytesIO(forged), max_duration=20.0).duration == pytest.approx(1.0)
    with pytest.raises(AudioDecodeError, match="decodes to more than its header declares"):
        load_audio(forged)
    assert load_audio(_wavpack(70.0)).duration == pytest.approx(70.0, abs=0.01)
    unknown = _wavpack(70.0, total=0xFFFFFFFF)
    assert probe(io.BytesIO(unknown)).duration is None
    assert load_audio(unknown).duration == pytest.approx(70.0, abs=0.01)


def test_a_wavpack_decoding_past_its_length_fails_its_job_with_a_415(client) -> None:
    """The same file through the API (202: its header says 1 s) and the session's real worker:
    the job fails in the documented shape, a 415, rather than analysing 70 s for 1."""
    r = client.post("/jobs/embedding", files={"file": ("forged.wv", _wavpack(70.0, total=16000), "audio/x-wavpack")})
    assert r.status_code == 202, r.text
    done = wait_for_job(client, r.json()["job_id"], 60)
    assert done["status"] == "failed", done
    assert set(done["error"]) == ERROR_KEYS | {"status_code"}, done
    assert done["error"]["status_code"] == 415, done
    assert "decodes to more than its header declares" in done["error"]["detail"], done
