"""Hostile audio, round 8: recordings that decode, but on which a step of the analysis had
nothing to work with."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import mp4_boxes, mp4_bytes, newest_job_ids


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

    before = newest_job_ids(client)
    started = time.monotonic()
    r = client.post("/jobs/diarize", files={"file": ("chunks.wav", _wav_with_chunks(200_000), "audio/wav")})
    assert r.status_code == 415, r.text
    assert "chunks" in r.json()["detail"] and r.json()["error_type"] == "ValidationError"
    assert time.monotonic() - started < 1.0
    assert newest_job_ids(client) == before


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


# --- MP4 sample tables and fragments: FFmpeg sizes its index by the counts they declare -----------


def _each(boxes: list, kind: bytes):
    for box in boxes:
        if box[0] == kind:
            yield box
        if isinstance(box[1], list):
            yield from _each(box[1], kind)


def _aac_mp4(seconds: float = 1.0, rate: int = 16000, movflags: str | None = None) -> bytes:
    """A tone as AAC in an MP4 (fragmented with ``movflags``), written by FFmpeg."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4", options={"movflags": movflags} if movflags else {}) as out:
        audio = out.add_stream("aac", rate=rate, layout="mono")
        tone = (np.sin(2 * np.pi * 220 * np.arange(int(rate * seconds)) / rate) * 0.3).astype(np.float32)
        for at in range(0, len(tone), 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, at : at + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in audio.encode(frame):
                out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _forged_sample_tables(samples: int) -> bytes:
    """1 s of AAC whose tables declare ``samples`` samples of 8 bytes in one chunk (stsz, stts,
    stsc, stco), its mdhd still 1 s: 7.5 KB."""
    import struct

    boxes = mp4_boxes(_aac_mp4())
    for box in _each(boxes, b"stts"):
        box[1] = struct.pack(">IIII", 0, 1, samples, 1024)
    for box in _each(boxes, b"stsz"):
        box[1] = struct.pack(">III", 0, 8, samples)
    for box in _each(boxes, b"stsc"):
        box[1] = struct.pack(">IIIII", 0, 1, 1, samples, 1)
    for box in _each(boxes, b"stco"):
        box[1] = struct.pack(">III", 0, 1, struct.unpack(">I", box[1][8:12])[0])
    return mp4_bytes(boxes)


def _forged_fragment(samples: int) -> bytes:
    """1 s of AAC in a fragmented MP4 whose one trun declares ``samples`` samples and none of
    their fields (the tfhd gives them all a duration and a size of 1): 7.5 KB."""
    import struct

    boxes = mp4_boxes(_aac_mp4(movflags="frag_keyframe+empty_moov"))
    for box in _each(boxes, b"trun"):
        flags = struct.unpack(">I", box[1][:4])[0]
        offset = struct.unpack(">i", box[1][8:12])[0] if flags & 1 else 0
        box[1] = struct.pack(">IIi", 1, samples, offset)  # a data offset, no sample's fields
    for box in _each(boxes, b"tfhd"):
        flags = struct.unpack(">I", box[1][:4])[0] & 0xFFFFFF
        at, present = 8, {}
        for bit, width in ((0x1, 8), (0x2, 4), (0x8, 4), (0x10, 4), (0x20, 4)):
            if flags & bit:
                present[bit], at = box[1][at : at + width], at + width
        present[0x8], present[0x10] = struct.pack(">I", 1024), struct.pack(">I", 1)
        box[1] = (struct.pack(">I", flags | 0x18) + box[1][4:8]
                  + b"".join(present[bit] for bit in (0x1, 0x2, 0x8, 0x10, 0x20) if bit in present))
    return mp4_bytes(boxes)


_FORGED = {"sample-tables": _forged_sample_tables, "fragment": _forged_fragment}


@pytest.mark.parametrize("forged", sorted(_FORGED))
def test_an_mp4_declaring_millions_of_samples_is_refused_at_submit(client, forged):
    """A 7.5 KB MP4 whose stsz declares 20 million samples (or one trun of a fragment as many)
    made FFmpeg size its index by that count when the API's header check opened it: the API's
    memory went from 79 to 817 MB, and the job was queued (202) for the worker's decoder to do
    the same (a trun: 781 MB before the duration limit's 413). Now the boxes are counted first:
    415, no job."""
    before = newest_job_ids(client)
    data = _FORGED[forged](20_000_000)
    assert len(data) < 10_000
    r = client.post("/jobs/diarize", files={"file": ("forged.m4a", data, "audio/mp4")})
    assert r.status_code == 415, r.text
    body = r.json()
    assert set(body) == {"detail", "error_type", "timestamp"} and body["error_type"] == "ValidationError"
    assert "declares 20000000 samples" in body["detail"]
    assert newest_job_ids(client) == before


@pytest.mark.parametrize("forged", sorted(_FORGED))
@pytest.mark.parametrize("module,function,args", [
    ("shared.audio_limits", "check_audio_limits", ", max_duration=3600"),  # the API's header check
    ("engine.audio", "load_audio", ""),  # the worker's decoder
])
def test_millions_of_declared_samples_are_refused_before_ffmpeg_indexes_them(tmp_path, forged, module, function,
                                                                             args):
    """Both the header check and the decoder refuse the file in a few MB: it took them 750 MB
    (20 million samples) and 2.2 GB (60 million) to open."""
    import subprocess
    import sys

    path = tmp_path / "forged.m4a"
    path.write_bytes(_FORGED[forged](60_000_000))
    code = _PEAK_MEMORY.format(module=module, function=function, args=args).replace(
        "{function}(sys.argv[1]{args})".format(function=function, args=args),
        "try:\n    {function}(sys.argv[1]{args})\nexcept Exception as exc:\n    print(exc)".format(
            function=function, args=args))
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    *said, peak = done.stdout.strip().splitlines()
    assert "declares 60000000 samples" in "\n".join(said), done.stdout
    assert int(peak) < 250, f"{function} peaked at {peak} MB"


def _pcm_mov(path, seconds: float, rate: int = 48000) -> None:
    """A tone as 16-bit PCM in a MOV, written by FFmpeg: its stsz declares a sample a frame
    (28.8 million for 10 min), its stts one entry of duration 1."""
    import av

    with av.open(str(path), "w", format="mov") as out:
        audio = out.add_stream("pcm_s16le", rate=rate, layout="mono")
        total = int(rate * seconds)
        for at in range(0, total, rate):
            tone = (np.sin(2 * np.pi * 220 * np.arange(at, min(total, at + rate)) / rate) * 8000).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(tone[None, :], format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in audio.encode(frame):
                out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)


def test_mp4s_and_movs_as_recorders_write_them_still_open(tmp_path):
    """An AAC M4A, a fragmented MP4 (one fragment: every packet in one trun) and 3 min of PCM in
    a MOV pass, and decode to their length. The PCM's stsz declares 8.6 million samples in 17 MB,
    more than one a byte of 8-bit PCM would be, but FFmpeg indexes uncompressed sound by chunks,
    1024 samples a packet (10 min took 54 MB to open, as 10 s did): counted as at most a packet
    per 160 samples of each chunk, an hour of 48 kHz is 1.1 million packets in its 345 MB, a
    1 GB upload of 8-bit mono 6.7 million, under both limits."""
    from engine.audio import load_audio
    from shared.audio_limits import check_audio_limits, check_mp4_edits

    m4a = tmp_path / "tone.m4a"
    m4a.write_bytes(_aac_mp4(20.0))
    fragmented = tmp_path / "fragmented.mp4"
    fragmented.write_bytes(_aac_mp4(60.0, rate=48000, movflags="frag_keyframe+empty_moov"))
    pcm = tmp_path / "pcm.mov"
    _pcm_mov(pcm, 180.0)
    for path, seconds in ((m4a, 20.0), (fragmented, 60.0), (pcm, 180.0)):
        with open(path, "rb") as fh:
            check_mp4_edits(fh)
        info = check_audio_limits(path, max_duration=3600)
        assert info is not None and info.duration == pytest.approx(seconds, abs=0.1), path.name
        assert load_audio(path).duration == pytest.approx(seconds, abs=0.1), path.name
