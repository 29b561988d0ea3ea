"""Files as users have them, from the real speech of ../shared/data: a podcast's AAC and MP3
behind a tagger's ID3v2 tag (cover art of megabytes, chapters), a call centre's 8 kHz G.711 WAV
written by a recorder that streams (its RIFF and data sizes left at 0 or 0xFFFFFFFF). Each goes
through the header check (as the API and the worker run it) and the decoder, and one of each
through the service as a job."""

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


def _call_wav(conversation: np.ndarray, subtype: str) -> tuple[bytes, float]:
    """A call as a call centre records it: 8 kHz stereo, one talker per channel, G.711 or PCM."""
    from engine.audio import resample

    x = np.asarray(resample(conversation, 16000, 8000), np.float32)
    half = len(x) // 2
    left, right = x.copy(), x.copy()
    left[half:], right[:half] = 0, 0
    buf = io.BytesIO()
    sf.write(buf, np.stack([left, right], axis=1), 8000, subtype=subtype, format="WAV")
    return buf.getvalue(), len(x) / 8000


def _streamed(wav: bytes, riff: int | None, data: int) -> bytes:
    """``wav`` with its RIFF and data sizes as a recorder writing to a stream leaves them."""
    out = bytearray(wav)
    if riff is not None:
        out[4:8] = struct.pack("<I", riff)
    at = out.find(b"data")
    out[at + 4 : at + 8] = struct.pack("<I", data)
    return bytes(out)


@pytest.mark.parametrize("subtype", ["ULAW", "ALAW", "PCM_16"])
@pytest.mark.parametrize("sizes", [(0, 0), (None, 0), (0xFFFFFFFF, 0xFFFFFFFF), (None, 0xFFFFFFFF)],
                         ids=["riff0-data0", "data0", "ffmpeg-pipe", "data-ffff"])
def test_streaming_recorders_wav_is_read_to_its_end(tmp_path, conversation, subtype, sizes):
    """A WAV whose data chunk declares 0 bytes and holds a call: libsndfile read no samples, so
    the header check said 0 s (202) and the worker refused it ("audio holds no samples", 415).
    FFmpeg reads such a chunk to the end of the file, as 0xFFFFFFFF was read already: now both
    the header check and the decoder give the call's length."""
    wav, seconds = _call_wav(conversation, subtype)
    _check_and_decode(tmp_path, _streamed(wav, *sizes), seconds, 8000, 2, tol=0.01)
    from shared.audio_limits import check_audio_limits

    path = tmp_path / "upload"
    assert check_audio_limits(path, max_duration=3600).duration == pytest.approx(seconds, abs=0.01)


def test_a_wav_header_without_samples_still_passes_as_0_s_and_fails_in_the_worker():
    """A data chunk of 0 bytes with nothing behind it is what it says: no samples (the header
    check's 0 s; the decoder's 415), as tests/conftest.py's ``wav_without_samples`` relies on."""
    from engine.audio import load_audio
    from shared.audio_limits import check_audio_limits
    from shared.errors import AudioDecodeError
    from tests.conftest import wav_without_samples

    assert check_audio_limits(io.BytesIO(wav_without_samples()), max_duration=3600).duration == 0.0
    with pytest.raises(AudioDecodeError, match="no samples"):
        load_audio(wav_without_samples())


def test_tagged_podcast_and_streamed_call_are_diarized_as_jobs(client, conversation):
    """Through the service, as users submit them: both jobs succeed, at their own lengths (the
    AAC failed in the worker, the WAV was taken for 0 s and failed there)."""
    seconds = len(conversation) / 16000
    aac = podcast_tag(2 << 20) + _encoded(_stereo(conversation, 44100), 44100, "adts", "aac")
    call, call_s = _call_wav(conversation, "ULAW")
    uploads = {"episode.aac": (aac, "audio/aac", seconds), "call.wav": (_streamed(call, 0, 0), "audio/wav", call_s)}
    jobs = {}
    for name, (data, mime, _) in uploads.items():
        r = client.post("/jobs/diarize", files={"file": (name, data, mime)})
        assert r.status_code == 202, r.text
        jobs[name] = r.json()["job_id"]
    for name, job_id in jobs.items():
        body = wait_for_job(client, job_id, timeout_s=300)
        assert body["status"] == "succeeded", (name, body.get("error"))
        assert body["result"]["audio_duration"] == pytest.approx(uploads[name][2], abs=0.1), name
        assert {s["speaker"] for s in body["result"]["diarization_results"]}, name


def test_mp4_and_matroska_behind_an_id3_tag_are_held_to_their_checks(tmp_path):
    """FFmpeg now opens what lies behind a file's ID3 tags, where an MP4 or a Matroska file opens
    as at a file's start (it refused them behind a tag before): the checks of their headers
    (edit lists, tags) read them there too, at submit and in the worker."""
    from engine.audio import load_audio
    from shared.audio_limits import MAX_EDITS, MAX_MKV_TAGS, check_audio_limits
    from shared.errors import AudioDecodeError
    from tests.test_hostile_round5_audio import _m4a, _with_edits
    from tests.test_hostile_round9_audio import _mkv, _named_tags

    tag = podcast_tag(4 << 10, chapters=2)
    hostile = {"edits.m4a": (_with_edits(_m4a(2.0), MAX_EDITS + 100), "edit-list"),
               "tags.mkv": (_mkv(_named_tags(MAX_MKV_TAGS + 100)), "tags")}
    for name, (data, words) in hostile.items():
        path = tmp_path / name
        path.write_bytes(tag + data)
        with pytest.raises(AudioDecodeError, match=words):
            check_audio_limits(path, max_duration=3600)
        with pytest.raises(AudioDecodeError, match=words):
            load_audio(path)
    # as writers make them, behind a tag: they open
    path = tmp_path / "tagged.mkv"
    path.write_bytes(tag + _mkv(seconds=2.0))
    assert check_audio_limits(path, max_duration=3600).duration == pytest.approx(2.0, abs=0.1)
    assert load_audio(path).duration == pytest.approx(2.0, abs=0.1)
