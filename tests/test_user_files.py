"""Files as users have them, from the real speech of ../shared/data: a podcast's AAC and MP3
behind a tagger's ID3v2 tag (cover art of megabytes, chapters). Each goes through the header
check (as the API and the worker run it) and the decoder, and through the service as a job."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import wait_for_job


def _syncsafe(n: int) -> bytes:
    return bytes([(n >> 21) & 0x7F, (n >> 14) & 0x7F, (n >> 7) & 0x7F, n & 0x7F])


def _frame(fid: bytes, body: bytes) -> bytes:  # an ID3v2.4 frame
    return fid + _syncsafe(len(body)) + b"\0\0" + body


def podcast_tag(cover_bytes: int, chapters: int = 8, total_ms: int = 20_000) -> bytes:
    """An ID3v2.4 tag as podcast tools write it: title, artist, a JPEG cover of ``cover_bytes``
    (APIC), chapters (CHAP, each with its title) and their table of contents (CTOC), padding."""
    jpeg = b"\xff\xd8\xff\xe0\0\x10JFIF\0" + np.random.default_rng(0).integers(0, 255, cover_bytes, np.uint8).tobytes()
    frames = [_frame(b"TIT2", b"\x03Episode 42\0"), _frame(b"TPE1", b"\x03A producer\0"),
              _frame(b"APIC", b"\x03image/jpeg\0\x03\0" + jpeg + b"\xff\xd9")]
    ids = [b"ch%d\0" % i for i in range(chapters)]
    for i, cid in enumerate(ids):
        times = struct.pack(">IIII", total_ms * i // chapters, total_ms * (i + 1) // chapters, 0xFFFFFFFF, 0xFFFFFFFF)
        frames.append(_frame(b"CHAP", cid + times + _frame(b"TIT2", b"\x03Chapter %d\0" % i)))
    frames.append(_frame(b"CTOC", b"toc\0\x03" + bytes([chapters]) + b"".join(ids)))
    body = b"".join(frames) + b"\0" * 2048
    return b"ID3\x04\x00\x00" + _syncsafe(len(body)) + body


@pytest.fixture(scope="module")
def conversation(utterances) -> np.ndarray:
    """About 20 s of two real talkers taking turns (16 kHz mono float32)."""
    pieces = []
    for one, two in zip(utterances["spk1"][:3], utterances["spk2"][:3]):
        for path in (one, two):
            pieces += [sf.read(path, dtype="float32")[0], np.zeros(6400, np.float32)]
    return np.concatenate(pieces)


def _stereo(mono16k: np.ndarray, rate: int) -> np.ndarray:
    from engine.audio import resample

    x = np.asarray(resample(mono16k, 16000, rate), np.float32)
    return np.stack([x, 0.8 * np.roll(x, 5)], axis=1)


def _encoded(samples: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    from evaluation.encoding import encode
    from shared.audio_limits import id3_end

    data = encode(samples, rate, container=container, codec=codec, bit_rate=128_000)
    return data[id3_end(io.BytesIO(data)):]  # without the muxer's own small tag: the tagger's goes first


def _check_and_decode(tmp_path, data: bytes, seconds: float, rate: int, channels: int, *, tol: float = 0.1) -> None:
    """The header check (a path and an upload's file object, read by FFmpeg in its sandbox as the
    API and the worker read them) and the decoder, on ``data`` stored under a name without an
    extension, as the service stores an upload."""
    from engine.audio import load_audio
    from shared.audio_limits import check_audio_limits
    from shared.probe_sandbox import ProbeLimits

    path = tmp_path / "upload"
    path.write_bytes(data)
    for source in (path, io.BytesIO(data)):
        info = check_audio_limits(source, max_duration=3600, sandbox=ProbeLimits())
        assert info is not None and (info.sample_rate, info.channels) == (rate, channels), (source, info)
    assert load_audio(path).duration == pytest.approx(seconds, abs=tol)


def test_aac_podcast_behind_megabytes_of_cover_art_is_read_as_aac(tmp_path, conversation):
    """FFmpeg tells a container from the first MB it reads, looking behind an ID3 tag only where
    the tag ends within it: an ADTS AAC behind a 2 MB tag (its cover art) was taken for an MP3
    without frames. It passed the header check with no sample rate (and 130 s for 300 s), was
    queued (202), and failed in the worker: 415 "audio stream holds no samples". Behind 200 KB of
    tag, or named ``.aac`` on disk, the same audio was read."""
    seconds = len(conversation) / 16000
    aac = _encoded(_stereo(conversation, 44100), 44100, "adts", "aac")
    for cover in (200 << 10, 2 << 20):
        _check_and_decode(tmp_path, podcast_tag(cover) + aac, seconds, 44100, 2)


def test_mp3_podcast_with_cover_art_and_chapters_is_read(tmp_path, conversation):
    """An MP3 behind a 3 MB tag (cover, chapters) was read before and is still: libsndfile reads
    its header, FFmpeg (which decodes an MP3 under 10 min) takes it for an MP3 however large the
    tag is, and now reads it from behind the tag."""
    seconds = len(conversation) / 16000
    mp3 = _encoded(_stereo(conversation, 48000), 48000, "mp3", "libmp3lame")
    _check_and_decode(tmp_path, podcast_tag(3 << 20) + mp3, seconds, 48000, 2, tol=0.06)


def test_tagged_podcast_is_diarized_as_a_job(client, conversation):
    """Through the service, as a podcast producer submits it: the job succeeds at the episode's
    length (it failed in the worker: "audio stream holds no samples")."""
    seconds = len(conversation) / 16000
    aac = podcast_tag(2 << 20) + _encoded(_stereo(conversation, 44100), 44100, "adts", "aac")
    r = client.post("/jobs/diarize", files={"file": ("episode.aac", aac, "audio/aac")})
    assert r.status_code == 202, r.text
    body = wait_for_job(client, r.json()["job_id"], timeout_s=300)
    assert body["status"] == "succeeded", body.get("error")
    assert body["result"]["audio_duration"] == pytest.approx(seconds, abs=0.1)
