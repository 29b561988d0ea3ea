"""Hostile audio, round 9: containers whose metadata costs FFmpeg far more than their size."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from tests.conftest import newest_job_ids


# --- a Matroska file, element by element --------------------------------------------------------
def _size(n: int) -> bytes:
    """An EBML element size: the shortest variable-length integer that holds ``n``."""
    for length in range(1, 9):
        if n < (1 << (7 * length)) - 1:
            return ((1 << (7 * length)) | n).to_bytes(length, "big")
    raise ValueError(n)


def _el(ident: str, payload: bytes) -> bytes:
    return bytes.fromhex(ident) + _size(len(payload)) + payload


def _mkv(level1: bytes = b"", seconds: float = 1.0, rate: int = 16000, *, first: bytes = b"",
         last: bytes = b"") -> bytes:
    """``seconds`` of a 16-bit PCM tone in a Matroska file, with ``level1`` (elements of the
    Segment) between its Tracks and its one Cluster; ``first`` and ``last`` begin and end the
    Segment."""
    ebml = _el("1A45DFA3", _el("4286", b"\x01") + _el("42F7", b"\x01") + _el("42F2", b"\x04") + _el("42F3", b"\x08")
               + _el("4282", b"matroska") + _el("4287", b"\x04") + _el("4285", b"\x02"))
    info = _el("1549A966", _el("2AD7B1", (1_000_000).to_bytes(3, "big")))
    audio = _el("E1", _el("B5", struct.pack(">d", float(rate))) + _el("9F", b"\x01") + _el("6264", b"\x10"))
    track = _el("AE", _el("D7", b"\x01") + _el("73C5", b"\x01") + _el("83", b"\x02") + _el("86", b"A_PCM/INT/LIT")
                + audio)
    pcm = (np.sin(2 * np.pi * 220 * np.arange(int(rate * seconds)) / rate) * 8000).astype("<i2").tobytes()
    cluster = _el("1F43B675", _el("E7", b"\x00") + _el("A3", b"\x81\x00\x00\x80" + pcm))
    return ebml + _el("18538067", first + info + _el("1654AE6B", track) + level1 + cluster + last)


def _named_tags(count: int) -> bytes:
    """A Tags element of ``count`` Tags, each one SimpleTag of a name of its own (about 17 bytes)."""
    tag = lambda i: _el("7373", _el("67C8", _el("45A3", b"K%d" % i) + _el("4487", b"v")))  # noqa: E731
    return _el("1254C367", b"".join(tag(i) for i in range(count)))


def test_a_matroska_of_thousands_of_tags_is_refused_at_submit_not_converted(client):
    """FFmpeg's Matroska demuxer converts the whole metadata dictionary again after each Tag, and
    each insertion searches it from its start: n tags of distinct names cost about n**3 steps. A
    second of audio with 2,000 such tags (67 KB) held the API's header check 13 s of a core (500:
    0.3 s, 1,000: 1.7 s, 10,000 (211 KB) over half an hour), FFmpeg's own loop, out of reach of
    any timeout, and the job was queued (202) for the worker to open it again. Now the tags are
    counted first (415 in milliseconds, no job)."""
    import time

    before = newest_job_ids(client)
    started = time.monotonic()
    r = client.post("/jobs/diarize", files={"file": ("tags.mkv", _mkv(_named_tags(2000)), "audio/x-matroska")})
    elapsed = time.monotonic() - started
    assert r.status_code == 415, r.text
    assert "tags" in r.json()["detail"] and r.json()["error_type"] == "ValidationError"
    assert elapsed < 1.0
    assert newest_job_ids(client) == before


def _seekhead(entries: list[tuple[str, int]]) -> bytes:
    return _el("114D9B74", b"".join(_el("4DBB", _el("53AB", bytes.fromhex(ident)) + _el("53AC", pos.to_bytes(4, "big")))
                                    for ident, pos in entries))


@pytest.mark.parametrize("shape", ["named tags", "empty tags", "cues", "seekhead", "tags behind the audio"])
def test_metadata_that_costs_ffmpeg_far_more_than_its_size_is_refused_before_it_opens(tmp_path, shape):
    """What FFmpeg reads into lists of structures when it opens a Matroska file costs it many
    times the bytes: 60 MB of empty Tag elements took 1.25 GB (a 1 GB upload would be 20 GB of the
    API), 13 MB of Cues 180 MB and 1 s, 3 MB of SeekHead entries 95 MB. Tags that only a SeekHead
    points at, behind the audio, are read at open all the same. Each is refused (415) by the
    header check and by the worker's decoder, before FFmpeg reads it."""
    from engine.audio import load_audio
    from shared.audio_limits import check_audio_limits
    from shared.errors import AudioDecodeError

    if shape == "named tags":
        data = _mkv(_named_tags(300))
    elif shape == "empty tags":
        data = _mkv(_el("1254C367", b"\x73\x73\x80" * 200_000))
    elif shape == "cues":
        point = _el("BB", _el("B3", b"\x00") + _el("B7", _el("F7", b"\x01") + _el("F1", b"\x00")))
        data = _mkv(_el("1C53BB6B", point * 700_000))
    elif shape == "seekhead":
        data = _mkv(_seekhead([("1254C367", 0)] * 10_000))
    else:
        # a SeekHead first in the Segment, the Tags behind the Cluster, where only it leads: its
        # position is the Tags' offset from the Segment's data (its 4 bytes whatever the value)
        plain = _mkv(first=_seekhead([("1254C367", 0)]))
        segment = plain.index(bytes.fromhex("18538067"))
        data_start = segment + 4 + 9 - plain[segment + 4].bit_length()  # after the Segment's size
        data = _mkv(first=_seekhead([("1254C367", len(plain) - data_start)]), last=_named_tags(300))
    path = tmp_path / "meta.mkv"
    path.write_bytes(data)
    with pytest.raises(AudioDecodeError, match="Matroska"):
        check_audio_limits(path, max_duration=3600)
    with pytest.raises(AudioDecodeError, match="Matroska"):
        load_audio(path)


def _written(fmt: str, codec: str, *, seconds: int = 30, tracks: int = 1, metadata: dict | None = None,
             options: dict | None = None) -> bytes:
    """A Matroska/WebM file as FFmpeg's muxer writes one (a Tag per track and one for the file)."""
    import av

    buf = io.BytesIO()
    rate = 48000 if codec == "libopus" else 16000
    with av.open(buf, "w", format=fmt, options=options or {}) as out:
        out.metadata.update(metadata or {})
        streams = [out.add_stream(codec, rate=rate, layout="mono") for _ in range(tracks)]
        for stream in streams:
            stream.metadata.update(metadata or {})
        for second in range(seconds):
            tone = np.sin(2 * np.pi * 220 * np.arange(second * rate, (second + 1) * rate) / rate)
            for stream in streams:
                pcm = codec == "pcm_s16le"
                samples = (tone * 8000).astype(np.int16) if pcm else (tone * 0.3).astype(np.float32)
                frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16" if pcm else "fltp", layout="mono")
                frame.sample_rate, frame.pts = rate, second * rate
                for packet in stream.encode(frame):
                    out.mux(packet)
        for stream in streams:
            for packet in stream.encode(None):
                out.mux(packet)
    return buf.getvalue()


def test_matroska_and_webm_as_writers_make_them_still_open(tmp_path):
    """PCM in Matroska, Opus in WebM (with cues, and as a live stream: clusters of unknown length
    and no cues, as a browser's MediaRecorder writes), and 16 tracks with 20 tags each (357 tags
    in 17 Tag elements) pass, and decode to their length."""
    from engine.audio import load_audio
    from shared.audio_limits import check_audio_limits

    files = {
        "pcm.mkv": (_written("matroska", "pcm_s16le"), 30.0),
        "opus.webm": (_written("webm", "libopus", seconds=120), 120.0),
        "live.webm": (_written("webm", "libopus", options={"live": "1"}), None),
        "tagged.mka": (_written("matroska", "pcm_s16le", tracks=16, metadata={f"TAG{i}": "v" for i in range(20)}),
                       30.0),
    }
    for name, (data, seconds) in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        info = check_audio_limits(path, max_duration=3600)
        assert info is not None and info.sample_rate is not None, name
        if seconds is not None:
            assert info.duration == pytest.approx(seconds, abs=0.1), name
        assert load_audio(path).duration == pytest.approx(seconds or 30.0, abs=0.1), name


# --- ID3 tags ahead of any container ------------------------------------------------------------
def _aac(seconds: float = 2.0, rate: int = 16000) -> bytes:
    """A tone as raw AAC (ADTS), which libsndfile does not read: FFmpeg opens it."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="adts") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        tone = (np.sin(2 * np.pi * 220 * np.arange(int(rate * seconds)) / rate) * 0.3).astype(np.float32)
        for at in range(0, len(tone), 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, at : at + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _id3(frames: int, version: int = 3) -> bytes:
    """An ID3v2 tag of ``frames`` user text frames (TXXX, or TXX in 2.2), each of a name of its own."""
    def safe(n: int) -> bytes:
        return bytes([(n >> 21) & 0x7F, (n >> 14) & 0x7F, (n >> 7) & 0x7F, n & 0x7F])

    body = b""
    for i in range(frames):
        payload = b"\x03K%d\x00v" % i
        if version == 2:
            body += b"TXX" + len(payload).to_bytes(3, "big") + payload
        else:
            size = safe(len(payload)) if version == 4 else struct.pack(">I", len(payload))
            body += b"TXXX" + size + b"\0\0" + payload
    return b"ID3" + bytes([version, 0, 0]) + safe(len(body)) + body


def test_id3_tags_of_thousands_of_frames_are_refused_at_submit_not_read(client):
    """FFmpeg reads the ID3v2 tags at the start of any file it opens and puts each text frame into
    a dictionary that every insertion searches from its start: n frames of their own names cost
    n**2 steps. 20,000 TXXX frames (370 KB) ahead of two seconds of AAC held the API's header check
    3.7 s of a core, 40,000 (730 KB) 17.8 s (a tag may be 256 MB), and the job was queued (202).
    Now the frames are counted first (415 in milliseconds, no job)."""
    import time

    before = newest_job_ids(client)
    started = time.monotonic()
    r = client.post("/jobs/diarize", files={"file": ("tagged.aac", _id3(20_000) + _aac(), "audio/aac")})
    elapsed = time.monotonic() - started
    assert r.status_code == 415, r.text
    assert "ID3" in r.json()["detail"] and r.json()["error_type"] == "ValidationError"
    # 0.3 s here, most of it building the 370 KB upload (timed with it): room for a loaded CI
    # host, and still half of the 3.7 s the header check took before
    assert elapsed < 2.0
    assert newest_job_ids(client) == before


@pytest.mark.parametrize("tags", ["2.2", "2.3", "2.4", "two tags"])
def test_the_worker_refuses_countless_id3_frames_before_ffmpeg_reads_them(tmp_path, tags):
    """The decoder keeps to the same count, in every version of the tag and across tags one after
    another (FFmpeg reads them all)."""
    from engine.audio import load_audio
    from shared.audio_limits import check_audio_limits
    from shared.errors import AudioDecodeError

    head = _id3(600) + _id3(600) if tags == "two tags" else _id3(2000, version=int(tags[-1]))
    path = tmp_path / "tagged.aac"
    path.write_bytes(head + _aac())
    with pytest.raises(AudioDecodeError, match="ID3"):
        check_audio_limits(path, max_duration=3600)
    with pytest.raises(AudioDecodeError, match="ID3"):
        load_audio(path)


def test_files_tagged_as_taggers_tag_them_still_open(tmp_path):
    """AAC and WAV behind an ID3 tag of 40 frames (with an extended header and a footer in 2.4),
    and an MP3 tagged by FFmpeg, pass and decode to their length."""
    import av

    from engine.audio import load_audio
    from shared.audio_limits import check_audio_limits
    from tests.conftest import tone_wav

    mp3 = tmp_path / "tagged.mp3"
    with av.open(str(mp3), "w", format="mp3") as out:
        out.metadata.update({"title": "a meeting", "artist": "someone", "comment": "tagged"})
        stream = out.add_stream("libmp3lame", rate=16000, layout="mono")
        tone = (np.sin(2 * np.pi * 220 * np.arange(16000 * 5) / 16000) * 0.3).astype(np.float32)
        for at in range(0, len(tone), 1152):
            frame = av.AudioFrame.from_ndarray(tone[None, at : at + 1152], format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    v24 = bytearray(_id3(40, version=4))
    v24[5] = 0x10  # a footer after the tag
    files = {"v23.aac": (_id3(40) + _aac(), 2.0), "v24.aac": (bytes(v24) + b"3DI" + bytes(v24[3:10]) + _aac(), 2.0),
             "v22.wav": (_id3(40, version=2) + tone_wav(2.0), 2.0), "tagged.mp3": (mp3.read_bytes(), 5.0)}
    for name, (data, seconds) in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        info = check_audio_limits(path, max_duration=3600)
        assert info is not None, name
        assert load_audio(path).duration == pytest.approx(seconds, abs=0.2), name  # AAC's priming


# --- Monkey's Audio -----------------------------------------------------------------------------
def _ape(frames: int, samples_per_frame: int = 1, rate: int = 16000) -> bytes:
    """An APE file (version 3.99) declaring ``frames`` frames of ``samples_per_frame`` samples, with
    the seek table FFmpeg requires (4 bytes a frame) and no audio worth decoding."""
    descriptor = b"MAC " + struct.pack("<HHIIIIIII", 3990, 0, 52, 24, 4 * frames, 0, 64, 0, 0) + b"\0" * 16
    header = struct.pack("<HHIIIHHI", 2000, 0, samples_per_frame, samples_per_frame, frames, 16, 1, rate)
    return descriptor + header + b"\0" * (4 * frames + 64)


def test_an_ape_declaring_millions_of_frames_is_refused_before_ffmpeg_tables_them(client, tmp_path):
    """FFmpeg's APE demuxer tables every frame the header declares, and indexes each, about 60
    bytes a frame from 4 of seek table: 3 million frames of one sample (12 MB) took 195 MB of the
    API's header check and passed it as 3 min of audio (202), 20 million (80 MB) 1.2 GB, FFmpeg's
    ceiling near 67 million 4 GB. Now refused at submit and by the decoder (415); a day of 48 kHz
    in an encoder's frames is 56,000 of them."""
    from engine.audio import load_audio
    from shared.audio_limits import check_audio_limits
    from shared.errors import AudioDecodeError

    before = newest_job_ids(client)
    r = client.post("/jobs/diarize", files={"file": ("many.ape", _ape(3_000_000), "audio/ape")})
    assert r.status_code == 415, r.text
    assert "APE" in r.json()["detail"] and r.json()["error_type"] == "ValidationError"
    assert newest_job_ids(client) == before
    path = tmp_path / "many.ape"
    path.write_bytes(_id3(3) + _ape(3_000_000))  # behind an ID3 tag, as FFmpeg finds it too
    with pytest.raises(AudioDecodeError, match="APE"):
        check_audio_limits(path, max_duration=86400)
    with pytest.raises(AudioDecodeError, match="APE"):
        load_audio(path)
    # a day of 48 kHz in frames of 73,728 samples has its header read
    day = tmp_path / "day.ape"
    day.write_bytes(_ape(57_000, samples_per_frame=73_728, rate=48_000))
    info = check_audio_limits(day, max_duration=86400 * 2)
    assert info is not None and info.duration == pytest.approx(57_000 * 73_728 / 48_000, rel=0.01)


# --- the walks themselves are bounded: they run in the API's thread, before the sandbox -----------
_EBML_HEAD = bytes.fromhex("1A45DFA3") + b"\x9f" + bytes.fromhex("4286810142F7810142F2810442F381084282847765626D4287810442858102")
_SEGMENT_UNKNOWN = bytes.fromhex("18538067") + b"\x01\xff\xff\xff\xff\xff\xff\xff"


def _cpu(fn, data: bytes) -> tuple[float, str]:
    import time

    started = time.process_time()
    try:
        fn(io.BytesIO(data))
        outcome = "passed"
    except Exception as exc:  # noqa: BLE001
        outcome = f"refused: {exc}"
    return time.process_time() - started, outcome


def _seekheads(count: int = 64) -> bytes:
    """``count`` SeekHeads of just under 64 KB each, every entry pointing at another of them."""
    def el4(ident: bytes, body: bytes) -> bytes:
        return ident + (0x10000000 | len(body)).to_bytes(4, "big") + body

    size = 64 * 1024 - 16
    seek = lambda pos: el4(b"\x4d\xbb", b"\x53\xab\x84\x11\x4d\x9b\x74" + b"\x53\xac\x84" + pos.to_bytes(4, "big"))  # noqa: E731
    per = size // len(seek(0))
    heads = b"".join(el4(b"\x11\x4d\x9b\x74", b"".join(seek(((i + k) % count) * (size + 8)) for k in range(per)).ljust(size, b"\0"))
                     for i in range(count))
    return _EBML_HEAD + _SEGMENT_UNKNOWN + heads


@pytest.mark.parametrize("shape", ["empty clusters", "elements before the audio", "seekheads", "id3 tags", "ape behind id3 tags"])
def test_the_format_walks_cost_the_api_milliseconds_whatever_the_size(shape):
    """The per-format walks read headers in the API's own thread, before the sandbox, and were
    bounded by nothing but the file: 0.24 s of CPU a MB of 5-byte empty Clusters (each walked),
    64 SeekHeads of 64 KB pointing at each other 1.3 s (255: 5.2 s, and 1.5 million positions
    queued), 0.14 s (check_id3) and 0.08 s (check_ape) a MB of empty ID3 tags: minutes of a core
    at the 1 GB upload limit. Now the Matroska walk stops at the first Cluster (as FFmpeg does),
    and each count is refused as soon as it passes its limit."""
    from shared.audio_limits import check_ape, check_id3, check_matroska

    if shape == "empty clusters":  # 10 MB: FFmpeg reads no further than the first
        fn, data, expect = check_matroska, _EBML_HEAD + _SEGMENT_UNKNOWN + bytes.fromhex("1F43B67580") * 2_000_000, "passed"
    elif shape == "elements before the audio":  # 10 MB of empty Void elements
        fn, data, expect = check_matroska, _EBML_HEAD + _SEGMENT_UNKNOWN + b"\xec\x80" * 5_000_000, "elements"
    elif shape == "seekheads":
        fn, data, expect = check_matroska, _seekheads(), "SeekHead"
    else:  # 10 MB of 10-byte empty ID3v2.3 tags
        fn, data, expect = (check_id3 if shape == "id3 tags" else check_ape), b"ID3\x03\0\0\0\0\0\0" * 1_000_000, "ID3 tags"
    cpu, outcome = _cpu(fn, data)
    assert expect in outcome, outcome
    assert cpu < 0.25, (shape, cpu)


def test_an_ebml_header_of_unknown_size_does_not_skip_the_matroska_check(tmp_path):
    """An EBML header whose size is unknown (0xFF), which FFmpeg opens as any other, was taken for
    "not Matroska" and the tags behind it were never counted. Now its children are read to the
    first element that is not one of its own, the Segment."""
    from shared.audio_limits import check_audio_limits, check_matroska, ffmpeg_header
    from shared.errors import AudioDecodeError

    def unknown_size(data: bytes) -> bytes:
        assert data[:4] == bytes.fromhex("1A45DFA3") and data[4] & 0x80  # a 1-byte size
        return data[:4] + b"\xff" + data[5:]

    written = tmp_path / "written.mkv"
    written.write_bytes(unknown_size(_written("matroska", "aac", seconds=2, metadata={"title": "t"})))
    assert ffmpeg_header(written) is not None  # FFmpeg opens it
    info = check_audio_limits(written, max_duration=3600)
    assert info is not None and 1.9 < info.duration < 2.2
    bomb = unknown_size(_mkv(_named_tags(300)))
    with pytest.raises(AudioDecodeError, match="tags"):
        check_matroska(io.BytesIO(bomb))
    path = tmp_path / "bomb.mkv"
    path.write_bytes(bomb)
    with pytest.raises(AudioDecodeError, match="Matroska"):
        check_audio_limits(path, max_duration=3600)
