"""Hostile audio, round 8: recordings that decode, but on which a step of the analysis had
nothing to work with."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf


def _hum_wav(seconds: float = 3.0, hz: float = 110.0) -> bytes:
    """A low steady hum: the segmentation hears a "speaker" in it, whose every stretch is too
    short (or too overlapped) to be embedded."""
    buf = io.BytesIO()
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(buf, (np.sin(2 * np.pi * hz * t) * 0.3).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.mark.parametrize("form", [{}, {"exclusive": "true"}, {"num_speakers": "2"}, {"max_speakers": "1"}])
def test_a_recording_where_nobody_could_be_embedded_is_diarized_not_an_internal_error(client, form):
    """3 s of a 110 Hz hum (so a short clip of a video's audio track, or a WAV whose header halves
    its rate) has speech by the segmentation's count but no speaker long enough to embed: every
    speaker inherited the throw-away cluster from neighbours that had none, and the
    reconstruction failed on -1 clusters (500 "internal error", ValueError: negative dimensions).
    Now pyannote's one cluster stands."""
    r = client.post("/diarize", files={"file": ("hum.wav", _hum_wav(), "audio/wav")}, data=form)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["audio_duration"] == pytest.approx(3.0, abs=0.01)
    assert body["segments_count"] == len(body["diarization_results"])
    assert {t["speaker"] for t in body["diarization_results"]} <= {"SPEAKER_00"}


def _wav_with_chunks(before: int, after: int = 0, *, prefix: bytes = b"", fmt_tag: int = 1) -> bytes:
    """One second of 16 kHz PCM in a WAV with ``before`` empty chunks ahead of its data chunk and
    ``after`` behind it (8 bytes each: the cheapest a chunk can be)."""
    import struct

    from tests.conftest import tone_wav

    pcm = tone_wav(1.0)[44:]
    empty = b"junk" + struct.pack("<I", 0)
    body = (b"WAVE" + b"fmt " + struct.pack("<IHHIIHH", 16, fmt_tag, 1, 16000, 32000, 2, 16) + empty * before
            + b"data" + struct.pack("<I", len(pcm)) + pcm + empty * after)
    return prefix + b"RIFF" + struct.pack("<I", len(body)) + body


def test_a_wav_of_countless_empty_chunks_is_refused_at_submit_not_walked(client, settings):
    """libsndfile gives up on a WAV of 200,000 empty chunks before its data ("no data chunk"), and
    FFmpeg's WAV demuxer then walked every one of them, a seek each, through the upload's Python
    file object: 1.6 MB took 1.7 s of the API's CPU at submit, 64 MB 31 s, and the job was queued
    (202) for the worker to walk them again. Now the chunks are counted first (415, no job)."""
    import time

    before = client.get("/jobs", params={"limit": 1}).json()["jobs"]
    started = time.monotonic()
    r = client.post("/jobs/diarize", files={"file": ("chunks.wav", _wav_with_chunks(200_000), "audio/wav")})
    assert r.status_code == 415, r.text
    assert "chunks" in r.json()["detail"] and r.json()["error_type"] == "ValidationError"
    assert time.monotonic() - started < 1.0
    assert client.get("/jobs", params={"limit": 1}).json()["jobs"] == before


def test_the_worker_refuses_countless_chunks_before_ffmpeg_walks_them(tmp_path):
    """The worker's decoder keeps to the same count (a file given by URL is checked there
    first), for chunks ahead of the data that libsndfile gives up on, chunks behind the data of a
    codec libsndfile does not read, and a WAV behind an ID3 tag, which FFmpeg skips."""
    from engine.audio import load_audio
    from shared.audio_limits import check_audio_limits
    from shared.errors import AudioDecodeError

    id3 = b"ID3\x04\x00\x00\x00\x00\x00\x0b" + b"\x00" * 11  # an odd length: chunks at odd offsets
    for name, data in {"before.wav": _wav_with_chunks(20_000),
                       "after.wav": _wav_with_chunks(0, 5000, fmt_tag=0x1234),
                       "tagged.wav": _wav_with_chunks(20_000, prefix=id3)}.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(AudioDecodeError, match="chunks"):
            check_audio_limits(path, max_duration=3600)
        with pytest.raises(AudioDecodeError, match="chunks"):
            load_audio(path)


def test_wavs_as_recorders_write_them_still_open(tmp_path):
    """A WAV of a few metadata chunks, one libsndfile reads past many empty chunks behind its
    audio (FFmpeg never opens it), and an RF64 (whose data chunk's length is in ds64) are not
    refused."""
    from shared.audio_limits import check_audio_limits, check_riff_chunks

    few = tmp_path / "few.wav"
    few.write_bytes(_wav_with_chunks(12))
    behind = tmp_path / "behind.wav"
    behind.write_bytes(_wav_with_chunks(0, 5000))
    rf64 = tmp_path / "rf64.wav"
    sf.write(rf64, np.zeros(16000, dtype=np.int16) + 100, 16000, format="RF64", subtype="PCM_16")
    for path in (few, behind, rf64):
        info = check_audio_limits(path, max_duration=3600)
        assert info is not None and info.duration == pytest.approx(1.0)
    for path in (few, rf64):
        with open(path, "rb") as fh:
            check_riff_chunks(fh)


def _mov_with_pictures(path, side: int = 8192, pictures: int = 2, seconds: float = 2.0) -> None:
    """A MOV of ``seconds`` of a tone (AAC) and ``pictures`` video streams of one black PNG
    picture each, ``side`` pixels square: a few hundred KB that FFmpeg's decoders make into
    ``side`` squared x 3 bytes a picture."""
    import av

    with av.open(str(path), "w", format="mov") as out:
        audio = out.add_stream("aac", rate=16000, layout="mono")
        videos = []
        for _ in range(pictures):
            video = out.add_stream("png", rate=1)
            video.width = video.height = side
            video.pix_fmt = "rgb24"
            videos.append(video)
        picture = av.VideoFrame.from_ndarray(np.zeros((side, side, 3), np.uint8), format="rgb24")
        for video in videos:
            for packet in [*video.encode(picture), *video.encode(None)]:
                out.mux(packet)
        tone = (np.sin(2 * np.pi * 220 * np.arange(int(16000 * seconds)) / 16000) * 0.3).astype(np.float32)
        for at in range(0, len(tone), 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, at : at + 1024], format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in audio.encode(frame):
                out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)


# the peak of this process's own memory (VmHWM: ru_maxrss would carry the forking pytest's over exec)
_PEAK_MEMORY = """
import re, sys
from {module} import {function}
{function}(sys.argv[1]{args})
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) // 1024)
"""


@pytest.mark.parametrize("module,function,args", [
    ("shared.audio_limits", "check_audio_limits", ", max_duration=3600"),  # the API's header check
    ("engine.audio", "load_audio", ""),  # the worker's decoder
])
def test_a_video_streams_pictures_are_never_decoded(tmp_path, module, function, args):
    """Opening a file, FFmpeg decodes the first frames of every stream whose parameters the header
    leaves out: two 8192 x 8192 PNG pictures beside 2 s of audio (a 0.5 MB MOV) took the API's
    header check and the worker's decoder about 400 MB above their 80 (a 16000-pixel picture
    735 MB, and each of up to 64 streams as much again). Only audio decoders may open now."""
    import subprocess
    import sys

    path = tmp_path / "pictures.mov"
    _mov_with_pictures(path)
    assert path.stat().st_size < 1 << 20
    code = _PEAK_MEMORY.format(module=module, function=function, args=args)
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    peak_mb = int(done.stdout.strip().splitlines()[-1])
    assert peak_mb < 250, f"{function} peaked at {peak_mb} MB"


def test_a_videos_audio_track_is_still_analysed(client, tmp_path):
    """The pictures are not decoded; the audio beside them is, as before."""
    path = tmp_path / "pictures.mov"
    _mov_with_pictures(path, side=1024, pictures=1, seconds=3.0)
    r = client.post("/diarize", files={"file": ("clip.mov", path.read_bytes(), "video/quicktime")})
    assert r.status_code == 200, r.text
    assert r.json()["audio_duration"] == pytest.approx(3.0, abs=0.1)
