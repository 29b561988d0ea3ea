"""A fifth round of hostile audio: containers whose header says one thing and whose data another.

The API checks a file's header (shared/audio_limits.py) and the worker decodes it (engine/audio.py):
both must read the same length, or refuse the file, in bounded time and memory. Files are crafted
here from a few seconds of tone encoded by FFmpeg (evaluation/encoding.py), their boxes and
elements rewritten. Against the session's Redis (AUDIO_ANALYSIS_TEST_REDIS_URL) and, for the
end-to-end case, its real Celery worker.
"""

from __future__ import annotations

import copy
import io
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from engine.audio import load_audio
from evaluation.encoding import encode
from shared.audio_limits import MAX_EDITS, MAX_STREAMS, DurationBudget, check_audio_limits, probe
from shared.errors import AudioDecodeError, AudioTooLongError

from tests.conftest import failed_job_error, mp4_boxes, mp4_bytes, wait_for_job

# the documented error body (an HTTP error's; a failed job's adds its status code)
ERROR_KEYS = {"detail", "error_type", "timestamp"}


def _tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


# --- MP4 boxes, rewritten ------------------------------------------------------------------------

def _child(box: list, kind: bytes) -> list:
    return next(c for c in box[1] if c[0] == kind)


def _m4a(seconds: float, rate: int = 8000) -> list:
    """An AAC M4A's boxes; FFmpeg writes its moov after the mdat, so it may change size freely."""
    boxes = mp4_boxes(encode(_tone(seconds, rate), rate, container="mp4", codec="aac", bit_rate=16000))
    assert [b[0] for b in boxes][-1] == b"moov"
    return boxes


def _with_edits(boxes: list, count: int) -> bytes:
    """Every track played ``count`` times over by its edit list (each edit: all of its media)."""
    boxes = copy.deepcopy(boxes)
    moov = boxes[-1]
    movie_length = struct.unpack(">I", _child(moov, b"mvhd")[1][16:20])[0]
    for trak in (c for c in moov[1] if c[0] == b"trak"):
        elst = struct.pack(">II", 0, count) + struct.pack(">IiI", movie_length, 0, 0x00010000) * count
        trak[1] = [c for c in trak[1] if c[0] != b"edts"]
        trak[1].insert(1, [b"edts", [[b"elst", elst]]])
    return mp4_bytes(boxes)


def _with_hidden_edits(boxes: list, count: int, where: str) -> bytes:
    """``count`` edits where FFmpeg still reads them but a walk of moov/trak/edts does not see
    them: an elst right in the trak, an edts after a box whose type is not text, an edts in the
    sample description's entry (FFmpeg reads the boxes after its fixed fields), or the whole moov
    compressed (cmov)."""
    boxes = copy.deepcopy(boxes)
    moov = boxes[-1]
    movie_length = struct.unpack(">I", _child(moov, b"mvhd")[1][16:20])[0]
    elst = [b"elst", struct.pack(">II", 0, count) + struct.pack(">IiI", movie_length, 0, 0x00010000) * count]
    trak = _child(moov, b"trak")
    trak[1] = [c for c in trak[1] if c[0] != b"edts"]
    if where == "trak":
        trak[1].insert(1, elst)
    elif where == "after-junk":  # a box of no printable type first, which FFmpeg walks past
        trak[1][1:1] = [[b"\x01\x02\x03\x04", b"junk"], [b"edts", [elst]]]
    elif where == "stsd":
        stsd = _child(_child(_child(_child(trak, b"mdia"), b"minf"), b"stbl"), b"stsd")
        body = stsd[1]  # version and flags, entry count, then the entries
        length = struct.unpack(">I", body[8:12])[0]
        extra = mp4_bytes([[b"edts", [elst]]])
        stsd[1] = body[:8] + struct.pack(">I", length + len(extra)) + body[12 : 8 + length] + extra + body[8 + length :]
    else:  # cmov: dcom names the compression, cmvd holds the moov's length and the zlib stream
        import zlib

        trak[1].insert(1, [b"edts", [elst]])
        raw = mp4_bytes([moov])
        boxes[-1] = [b"moov", [[b"cmov", [[b"dcom", b"zlib"], [b"cmvd", struct.pack(">I", len(raw)) + zlib.compress(raw)]]]]]
    return mp4_bytes(boxes)


def _with_tracks(boxes: list, count: int) -> bytes:
    """The audio track ``count`` times, every copy over the same samples."""
    boxes = copy.deepcopy(boxes)
    moov = boxes[-1]
    trak = _child(moov, b"trak")
    moov[1] = [c for c in moov[1] if c[0] != b"trak"] + [copy.deepcopy(trak) for _ in range(count)]
    return mp4_bytes(boxes)


def _with_media_length(boxes: list, version1_length: int) -> bytes:
    """The track's mdhd rewritten as version 1, its 64-bit duration ``version1_length``."""
    boxes = copy.deepcopy(boxes)
    mdhd = _child(_child(_child(boxes[-1], b"trak"), b"mdia"), b"mdhd")
    body = mdhd[1]
    mdhd[1] = b"\x01\x00\x00\x00" + b"\0" * 16 + body[12:16] + struct.pack(">q", version1_length) + body[20:]
    return mp4_bytes(boxes)


def _mka_with_duration(seconds: float, duration_s: float | None) -> bytes:
    """Opus in Matroska, its Segment's Duration element (float64, in ms) rewritten, or made a
    Void element of the same size (None: what a live recorder writes, no length at all)."""
    b = encode(_tone(seconds, 48000), 48000, container="matroska", codec="libopus")
    at = b.find(b"\x44\x89\x88")
    assert at > 0, "no 8-byte Duration element"
    element = b"\xec\x89" + bytes(9) if duration_s is None else b"\x44\x89\x88" + struct.pack(">d", duration_s * 1000.0)
    return b[:at] + element + b[at + 11 :]


def _wav(seconds: float) -> bytes:
    out = io.BytesIO()
    sf.write(out, _tone(seconds, 16000), 16000, format="WAV", subtype="PCM_16")
    return out.getvalue()


@pytest.fixture(scope="module")
def m4a() -> list:
    return _m4a(1.0)


@pytest.fixture()
def short_limit_api(settings):
    """The API in-process with a 20 s limit on a job's audio; its jobs go to a queue nobody
    consumes (nothing refused here reaches one)."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    local = settings.model_copy(update={"max_audio_seconds": 20.0, "queue_name": "audio-round5-audio"})
    with TestClient(create_app(local), raise_server_exceptions=False) as c:
        yield c


def _assert_error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert set(r.json()) == ERROR_KEYS, r.text
    return r.json()


# --- a negative length is no length --------------------------------------------------------------


def test_a_negative_declared_length_is_unknown_not_subtracted_from_the_job(m4a, short_limit_api):
    """An MP4's mdhd (version 1: 64 bits) and a Matroska Duration (a float) hold any number: both
    read as -1e12 s or so, passed the duration limit and took it off the job's total, so that an
    enrollment's other files passed over the limit together; the worker's time limit came out at
    1 s. A length no file can have is unknown: the file passes, and the others are counted."""
    forged = {"neg.m4a": _with_media_length(m4a, -(1 << 62)), "neg.mka": _mka_with_duration(3.0, -1e12)}
    for name, data in forged.items():
        info = probe(io.BytesIO(data))
        assert info is not None and info.duration is None, (name, info)
        # and the worker decodes what the file holds
        assert 0.9 < load_audio(data).duration < 3.5, name
    wav = ("twelve.wav", _wav(12.0), "audio/wav")
    for name, data in forged.items():
        files = [("files", (name, data, "application/octet-stream")), ("files", wav), ("files", wav)]
        r = short_limit_api.post("/jobs/enroll", files=files, data={"label": "x"})
        error = _assert_error(r, 413)
        assert error["detail"] == "the job's audio files are 24 s long together; the limit is 20 s", error
    budget = DurationBudget(20.0)
    budget.add(probe(io.BytesIO(forged["neg.mka"])))
    budget.add(probe("/nonexistent/upload.m4a"))  # unreadable: no length, as before
    budget.add(probe(io.BytesIO(_wav(12.0))))
    with pytest.raises(AudioTooLongError):
        budget.add(probe(io.BytesIO(_wav(12.0))))


# --- MP4 edit lists: FFmpeg expands them into its index when it opens the file -------------------


def test_an_mp4_whose_edit_list_replays_its_media_is_refused_before_ffmpeg_opens_it(m4a, short_limit_api):
    """1000 edits, each playing the track's 1 s of media again: the header says 1 s, FFmpeg
    opened it into 1000 copies of its packet index and decoded 1000 s (100000 edits over 60 s
    of media, a 1.3 MB upload, took 1.1 GB to open). Refused by the API's header check and by
    the decoder, from the box headers, before FFmpeg sees the file."""
    bomb = _with_edits(m4a, 1000)
    assert len(bomb) < 60_000
    detail = f"MP4 file holds 1000 edit-list entries; at most {MAX_EDITS} are supported"
    started = time.monotonic()
    with pytest.raises(AudioDecodeError, match=detail):
        check_audio_limits(io.BytesIO(bomb), max_duration=20.0)
    with pytest.raises(AudioDecodeError, match=detail):
        load_audio(bomb)
    # milliseconds (the box headers alone): 2 s leaves a loaded CI host room, where FFmpeg took
    # the file's 1000 s of replayed media
    assert time.monotonic() - started < 2.0
    r = short_limit_api.post("/jobs/embedding", files={"file": ("edits.m4a", bomb, "audio/mp4")})
    assert _assert_error(r, 415)["detail"] == detail
    # a recorder's own edit list (one edit: the media less its encoder delay) is read as before
    assert 0.9 < load_audio(_with_edits(m4a, 1)).duration < 1.2
    assert 0.9 < load_audio(mp4_bytes(m4a)).duration < 1.2


@pytest.mark.parametrize("where", ["trak", "after-junk", "stsd", "cmov"])
def test_edits_where_ffmpeg_still_finds_them_are_counted(m4a, where):
    """FFmpeg takes a box for what its type says wherever it lies, and inflates a compressed
    moov: 20000 edits in 1 KB of zlib took 233 MB to open. Each placement is refused as the
    plain one is, at the header check and in the decoder."""
    bomb = _with_hidden_edits(m4a, 500 if where != "cmov" else 20000, where)
    detail = "compressed \\(cmov\\)" if where == "cmov" else "MP4 file holds 500 edit-list entries"
    with pytest.raises(AudioDecodeError, match=detail):
        check_audio_limits(io.BytesIO(bomb), max_duration=20.0)
    with pytest.raises(AudioDecodeError, match=detail):
        load_audio(bomb)


def test_audio_decoding_far_past_its_mp4_or_matroska_header_is_refused(m4a):
    """Within the edit limit, 100 edits still made the 1 s the header declares (what the API
    held the file to, and the worker's time limit) decode to 100 s, and a Matroska whose Duration
    says 1 s holds what it likes: decoding past twice the declared length and a minute more is
    refused, as soon as it gets there."""
    replayed = _with_edits(m4a, 100)
    info = probe(io.BytesIO(replayed))
    assert info is not None and info.duration is not None and info.duration < 1.2, info
    with pytest.raises(AudioDecodeError, match="decodes to more than its header declares"):
        load_audio(replayed)
    long_mka = _mka_with_duration(70.0, 1.0)
    assert probe(io.BytesIO(long_mka)).duration == pytest.approx(1.0)
    with pytest.raises(AudioDecodeError, match="decodes to more than its header declares"):
        load_audio(long_mka)
    # a length within the slack, and a Matroska that declares none (a live recording's), decode
    assert 68 < load_audio(_mka_with_duration(70.0, 10.0)).duration < 71
    no_duration = _mka_with_duration(70.0, None)
    assert probe(io.BytesIO(no_duration)).duration is None
    assert 68 < load_audio(no_duration).duration < 71


def test_an_mp3_whose_xing_header_undercounts_its_frames_is_refused_as_it_decodes():
    """The Xing header's frame count is what libsndfile (the API's header check) and FFmpeg take
    for an MP3's length: 100 of 2503 frames, its byte count left true, passed as 3.5 s and
    decoded to 90 s (1 GB of such an MP3 to the 24 h limit, past the synchronous route's 30 min
    and the job's time limit). Refused past twice its count and a minute; an MP3 whose byte count
    is not the file's (two joined, tests/test_audio_decode.py) is still decoded to its end."""
    honest = bytearray(encode(_tone(90.0, 16000), 16000, container="mp3", codec="libmp3lame", bit_rate=32000))
    tag = max(honest.find(b"Xing"), honest.find(b"Info"))
    assert tag > 0 and int.from_bytes(honest[tag + 4 : tag + 8], "big") & 3 == 3, "no Xing frames and bytes"
    forged = bytearray(honest)
    forged[tag + 8 : tag + 12] = (100).to_bytes(4, "big")
    assert check_audio_limits(io.BytesIO(bytes(forged)), max_duration=20.0).duration == pytest.approx(3.5, abs=0.1)
    with pytest.raises(AudioDecodeError, match="decodes to more than its header declares"):
        load_audio(bytes(forged))
    assert 89.5 < load_audio(bytes(honest)).duration < 90.5


# --- a stream that changes its format on every frame ---------------------------------------------


def _adts_frames(data: bytes) -> list[bytes]:
    frames, at = [], 0
    while at + 7 <= len(data):
        length = ((data[at + 3] & 3) << 11) | (data[at + 4] << 3) | (data[at + 5] >> 5)
        frames.append(data[at : at + length])
        at += length
    return frames


def test_a_stream_changing_its_rate_on_every_frame_is_refused():
    """ADTS frames alternating 8 and 96 kHz: each change drains and rebuilds the converters, and
    1128 such frames took 0.48 s against 0.05 s in two runs (a day of them about 9 min). More
    than 1000 changes are refused; a stream that changes a few times is decoded as before
    (tests/test_bad_input_engine.py)."""
    low = _adts_frames(encode(_tone(80.0, 8000), 8000, container="adts", codec="aac"))
    high = _adts_frames(encode(_tone(6.0, 96000), 96000, container="adts", codec="aac"))
    count = min(len(low), len(high))
    assert count > 501
    alternating = b"".join(frame for pair in zip(low[:count], high[:count]) for frame in pair)
    started = time.monotonic()
    with pytest.raises(AudioDecodeError, match="more than 1000 times"):
        load_audio(alternating)
    print(f"\n{2 * count} alternating frames refused in {time.monotonic() - started:.2f} s")
    # the same frames in two runs: one change
    assert load_audio(b"".join(low[:count] + high[:count])).duration > 60


# --- MP4 tracks over the same samples: FFmpeg's demuxer looks through all of them per packet -----


def test_an_mp4_of_more_streams_than_any_recording_is_refused_at_once(m4a):
    """300 tracks over one 10 min track's samples (a 6.6 MB upload) took 5.7 s to decode instead
    of 0.3 s, 999 tracks 95 s: FFmpeg's MP4 demuxer searches every track for each packet. More
    than MAX_STREAMS streams and FFmpeg refuses the file as it opens it."""
    many = _with_tracks(m4a, MAX_STREAMS + 1)
    started = time.monotonic()
    # refused at submit now: FFmpeg's refusal of the streams (ENOMEM) comes out of the header
    # check's sandbox as a 415 (shared/probe_sandbox.py), where it was "unreadable here" (None)
    # and the worker answered the 415
    with pytest.raises(AudioDecodeError, match="more streams than it may open"):
        probe(io.BytesIO(many))
    with pytest.raises(AudioDecodeError, match=f"more than {MAX_STREAMS} streams"):
        load_audio(many)
    # 0.01 s, 0.3 s where the probe's fork server starts first in this process (3x that on a
    # loaded CI host): refused as it opens, not after a decode of the streams (300: 5.7 s)
    assert time.monotonic() - started < 2.0
    # up to the limit they are read, the first audio track decoded
    assert probe(io.BytesIO(_with_tracks(m4a, MAX_STREAMS))).duration == pytest.approx(1.0, abs=0.1)
    assert 0.9 < load_audio(_with_tracks(m4a, MAX_STREAMS)).duration < 1.2


# --- FFmpeg's frames of 8 or more channels: PyAV read past the frame's plane pointers -----------


def _pcm_mka(channels: np.ndarray, rate: int = 16000) -> bytes:
    """(frames, channels) float samples as 16-bit PCM in Matroska (a layout of its channel count
    only, as a recorder's multitrack file has): read by FFmpeg, not libsndfile."""
    import av

    pcm = np.round(np.clip(channels, -1, 1) * 32767).astype(np.int16)
    layout = f"{pcm.shape[1]} channels"
    out = io.BytesIO()
    with av.open(out, "w", format="matroska") as mka:
        stream = mka.add_stream("pcm_s16le", rate=rate, layout=layout)
        for start in range(0, len(pcm), 4096):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[start : start + 4096]).reshape(1, -1),
                                               format="s16", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                mka.mux(packet)
        for packet in stream.encode(None):
            mka.mux(packet)
    return out.getvalue()


def _decode_elsewhere(path: Path) -> tuple[int, str]:
    """load_audio(path) in a fresh process (a crash there is a failure here, not pytest's end):
    (exit status, what it printed)."""
    import subprocess
    import sys

    code = ("import numpy, engine.audio as a; x = a.load_audio(%r).samples; "
            "numpy.save(%r, x)" % (str(path), str(path) + ".npy"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stderr[-2000:]


@pytest.mark.parametrize("count", [8, 12, 24])
def test_a_file_of_many_channels_read_by_ffmpeg_is_the_mean_of_its_channels(tmp_path, count):
    """A 7.1 or 22.2 file read through FFmpeg (PCM in Matroska here; 7.1 AAC or E-AC-3 of a film
    alike) killed the process decoding it with SIGSEGV: PyAV 18.1 counted the converted planar
    frame's planes one too many and to_ndarray read through a pointer past AVFrame.data. It is
    now the mean of its channels, the same samples as the same channels in a WAV (libsndfile)."""
    rng = np.random.default_rng(count)
    levels = rng.uniform(0.05, 0.4, count).astype(np.float32)
    channels = _tone(2.0, 16000)[:, None] * levels[None, :] + rng.normal(0, 0.01, (32000, count)).astype(np.float32)
    path = tmp_path / f"{count}.mka"
    path.write_bytes(_pcm_mka(channels))
    status, err = _decode_elsewhere(path)
    assert status == 0, f"exit status {status}: {err}"
    decoded = np.load(str(path) + ".npy")
    wav = tmp_path / f"{count}.wav"
    sf.write(wav, np.round(np.clip(channels, -1, 1) * 32767).astype(np.int16), 16000, subtype="PCM_16")
    assert np.array_equal(decoded, load_audio(wav).samples)


# --- end to end: the worker answers in the documented shape --------------------------------------


def test_a_file_decoding_past_its_header_fails_its_job_with_a_415(client, m4a):
    """The API takes the replayed MP4 for the 1 s its header says; the real worker refuses it
    while decoding, in the documented error shape, instead of analysing 100 s of audio."""
    replayed = _with_edits(m4a, 100)
    error = failed_job_error(client, "/jobs/embedding", {"file": ("replayed.m4a", replayed, "audio/mp4")})
    assert error["status_code"] == 415 and error["error_type"] == "ValidationError", error
    assert "decodes to more than its header declares" in error["detail"], error


def test_the_worker_analyses_an_8_channel_file_read_by_ffmpeg(client, utterances):
    """Real speech on 8 channels in Matroska: the worker's decoder crashed on it (SIGSEGV); the
    job now succeeds, the voice the same as the mono file's."""
    speech, rate = sf.read(utterances["spk1"][0], dtype="float32")
    mka = _pcm_mka(np.repeat(speech[:, None], 8, axis=1) * 0.9, rate)
    r = client.post("/jobs/embedding", files={"file": ("eight.mka", mka, "audio/x-matroska")})
    assert r.status_code == 202, r.text
    done = wait_for_job(client, r.json()["job_id"], 90)
    assert done["status"] == "succeeded", done


# --- a length the header only estimates: held to the job's limit as it decodes -------------------


def _adts_estimated_short(seconds: float, *, damaged: bool = False) -> tuple[bytes, float | None]:
    """100 loud AAC frames, then ``seconds`` of quiet ones: FFmpeg estimates an ADTS stream's
    length from its first frames' bitrate, so its header says a small part of it. The header check
    counts an ADTS stream's frames now (shared.audio_limits.adts_length), and finds the whole
    length, unless ``damaged``: 2 KB that are not frames between the loud and the quiet ones,
    which FFmpeg resyncs past and the count cannot, so the length is unknown (None)."""
    rng = np.random.default_rng(0)
    loud = _adts_frames(encode((rng.standard_normal(16000 * 8) * 0.5).astype(np.float32), 16000,
                               container="adts", codec="aac", bit_rate=256_000))
    quiet = _adts_frames(encode(np.zeros(int(16000 * seconds), np.float32), 16000, container="adts", codec="aac",
                                bit_rate=8_000))
    data = b"".join(loud[:100] + ([bytes(2048)] if damaged else []) + quiet)
    return data, probe(io.BytesIO(data)).duration


def test_a_synchronous_request_decodes_no_further_than_its_own_limit(client, settings, tmp_path):
    """An ADTS stream whose header says about a minute and which holds 1900 s: the API and the
    worker's header check took it for its minute, and a synchronous request (limit 1800 s)
    decoded all of it, as a queued job may, to analyse silence. The worker now holds each file
    to the job's own limit as it decodes: the documented 413.

    The header check now counts the frames of such a stream and refuses it at submit
    (tests/test_user_files_2.py); the decoder's hold is what stands where the header does not
    know the length (MP3 without a Xing header, AMR, an ADTS stream whose frames cannot all be
    counted), as for this damaged one: the header check lets it through, as it let the estimate."""
    data, declared = _adts_estimated_short(1900.0, damaged=True)
    assert declared is None, declared
    assert settings.sync_max_audio_seconds < 1900 < settings.max_audio_seconds
    r = client.post("/embedding", files={"file": ("estimated.aac", data, "audio/aac")}, timeout=120)
    error = _assert_error(r, 413)
    assert f"limit of {settings.sync_max_audio_seconds:.0f} s" in error["detail"], error
