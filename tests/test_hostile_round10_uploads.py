"""Round 10: what a new user's trial of the upload routes found.

Files that are not audio at all (a text file named .wav, a web page, a JPEG named .mp3, an MP4
with a video stream and no sound) were answered 202 by ``POST /jobs/diarize``, stored and queued,
and failed in the worker with the 415 its decoder gives ("not a decodable audio file
(InvalidDataError)", "file has no audio stream"). A batch holding one of them was queued whole,
though docs/service.md promises that a batch refused for one file leaves no job behind: the API's
header check took "neither libsndfile nor FFmpeg opens it" for "its header went unread, let it
through". Such a file is refused at submit now (415, the file named), single, batch and
synchronous alike, and nothing of it is stored; the formats users upload still pass.

The synchronous endpoints' 413 said "submit it to /jobs/* instead" only where the header states
the file's length: 35 min of a browser's live WebM (no duration in its header), found too long by
the worker as it decodes, was answered "audio is longer than the limit of 1800 s" alone.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from evaluation.encoding import encode
from shared.audio_limits import SYNC_HINT, NotAudioError, check_audio_limits, probe
from shared.probe_sandbox import ProbeLimits
from tests.conftest import wait_for_job

ERROR_KEYS = {"detail", "error_type", "timestamp"}


def _assert_error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == ERROR_KEYS and body["error_type"] == "ValidationError", body
    return body


def _speech(utterances) -> tuple[np.ndarray, int]:
    samples, rate = sf.read(utterances["spk1"][0], dtype="float32")
    return samples, rate


def _written(samples: np.ndarray | None, rate: int, fmt: str, codec: str | None, *, video: bool = False,
             options: dict | None = None) -> bytes:
    """``samples`` (mono) as ``codec`` in ``fmt``, beside a few frames of video where ``video``;
    ``samples`` None: the video alone."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt, options=options or {}) as out:
        picture = out.add_stream("libvpx" if fmt == "webm" else "mpeg4", rate=25) if video else None
        if picture is not None:
            picture.width, picture.height, picture.pix_fmt = 64, 64, "yuv420p"
        if samples is not None and codec is not None:
            sound = out.add_stream(codec, rate=rate, layout="mono")
            frame_size = 960 if codec == "libopus" else 1024
            for start in range(0, len(samples) - frame_size, frame_size):
                frame = av.AudioFrame.from_ndarray(samples[None, start : start + frame_size].astype(np.float32),
                                                   format="fltp", layout="mono")
                frame.sample_rate, frame.pts = rate, start
                for packet in sound.encode(frame):
                    out.mux(packet)
            for packet in sound.encode(None):
                out.mux(packet)
        if picture is not None:
            for i in range(10):
                image = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 20 * i, np.uint8), format="rgb24")
                image.pts = i
                for packet in picture.encode(image):
                    out.mux(packet)
            for packet in picture.encode(None):
                out.mux(packet)
    return buf.getvalue()


def _jpeg() -> bytes:
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 64, 64, "yuvj420p"
    encoder.time_base = Fraction(1, 25)
    image = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 128, np.uint8), format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in [*encoder.encode(image), *encoder.encode(None)])


def _not_audio() -> dict[str, tuple[bytes, str, str]]:
    """(bytes, MIME type as a browser sends it, the reason the decoder gives) by file name."""
    return {
        "notes.wav": (b"Meeting notes, 3 March\n- budget\n- hiring\n" * 20, "audio/wav", "not a decodable audio file"),
        "download.wav": (b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>" + b"<p>x</p>" * 200
                         + b"</body></html>", "audio/wav", "not a decodable audio file"),
        "photo.mp3": (_jpeg(), "audio/mpeg", "not a decodable audio file"),
        "screen.mp4": (_written(None, 16000, "mp4", None, video=True), "video/mp4", "file has no audio stream"),
    }


def _listed(client) -> set[str]:
    return {j["job_id"] for j in client.get("/jobs", params={"limit": 100}).json()["jobs"]}


def _stored(settings) -> set[Path]:
    root = Path(settings.storage_dir)
    return set(root.rglob("*")) if root.exists() else set()


# --- A. not audio: refused at submit ---------------------------------------------------------------


def test_files_that_are_not_audio_are_refused_at_submit_and_nothing_is_kept(client, settings):
    before, stored = _listed(client), _stored(settings)
    for name, (data, mime, why) in _not_audio().items():
        r = client.post("/jobs/diarize", files={"file": (name, data, mime)})
        error = _assert_error(r, 415)
        # the file named, then the words the worker's decoder used for it
        assert error["detail"].startswith(f"uploaded file {name!r}: {why}"), (name, error)
    assert _listed(client) == before
    assert {p for p in _stored(settings) - stored if p.is_file()} == set()


def test_a_batch_holding_one_file_that_is_not_audio_is_refused_whole(client, settings, utterances):
    conversation = utterances["spk1"][0].read_bytes()
    notes, _, _ = _not_audio()["notes.wav"]
    before, stored = _listed(client), _stored(settings)
    for kind in ("diarize", "embedding"):
        r = client.post("/jobs/batch", data={"kind": kind}, files=[
            ("files", ("conv.wav", conversation, "audio/wav")), ("files", ("notes.wav", notes, "audio/wav")),
            ("files", ("conv2.wav", conversation, "audio/wav"))])
        error = _assert_error(r, 415)
        assert error["detail"] == "uploaded file 'notes.wav': not a decodable audio file (InvalidDataError)", error
    assert _listed(client) == before  # no job of the batch's audio files, before or after notes.wav
    assert {p for p in _stored(settings) - stored if p.is_file()} == set()
    # the batch as it should have been is taken
    r = client.post("/jobs/batch", data={"kind": "embedding"}, files=[
        ("files", ("conv.wav", conversation, "audio/wav")), ("files", ("conv2.wav", conversation, "audio/wav"))])
    assert r.status_code == 202, r.text
    for job in r.json()["jobs"]:
        client.post(f"/jobs/{job['job_id']}/cancel")


def test_the_synchronous_routes_refuse_it_as_they_refuse_other_415s(client, utterances):
    wav = utterances["spk1"][0].read_bytes()
    cases = _not_audio()
    page, _, _ = cases["download.wav"]
    screen, _, _ = cases["screen.mp4"]
    before = _listed(client)
    error = _assert_error(client.post("/diarize", files={"file": ("download.wav", page, "audio/wav")}), 415)
    assert error["detail"] == "uploaded file 'download.wav': not a decodable audio file (InvalidDataError)", error
    error = _assert_error(client.post("/embedding", files={"file": ("screen.mp4", screen, "video/mp4")}), 415)
    assert error["detail"] == "uploaded file 'screen.mp4': file has no audio stream", error
    r = client.post("/compare", files={"file1": ("a.wav", wav, "audio/wav"),
                                       "file2": ("screen.mp4", screen, "video/mp4")})
    assert _assert_error(r, 415)["detail"] == "uploaded file 'screen.mp4': file has no audio stream"
    assert _listed(client) == before


def test_the_header_read_in_process_refuses_it_too(variant_app):
    """``AUDIO_ANALYSIS_PROBE_SANDBOX=false`` reads FFmpeg's header in the API's own process."""
    unbounded = variant_app(probe_sandbox=False)
    for name, (data, mime, why) in _not_audio().items():
        error = _assert_error(unbounded.post("/jobs/embedding", files={"file": (name, data, mime)}), 415)
        assert error["detail"].startswith(f"uploaded file {name!r}: {why}"), (name, error)


def test_what_the_worker_fetches_by_url_keeps_its_words(client, media_server):
    """Audio by URL is checked by the worker (shared/url_input.py), in words of its own."""
    screen, _, _ = _not_audio()["screen.mp4"]
    url = media_server.file("/screen.mp4", screen, "audio/mp4")
    r = client.post("/jobs/embedding", data={"file_url": url})
    assert r.status_code == 202, r.text
    done = wait_for_job(client, r.json()["job_id"], 60)
    assert done["status"] == "failed" and done["error"]["status_code"] == 415, done
    assert done["error"]["detail"] == (f"file_url: what {url} sent ({len(screen)} bytes) is not audio in a format "
                                       "this service reads"), done


def test_probe_still_answers_none_for_what_is_not_audio():
    """``probe`` answers None for what is not audio (a caller that wants a length only), where
    ``check_audio_limits`` (and ``audio_header``, which the offline CLI reads before it loads the
    engine) refuse it: unchanged."""
    for name, (data, _, why) in _not_audio().items():
        assert probe(io.BytesIO(data)) is None, name
        with pytest.raises(NotAudioError, match=why):
            check_audio_limits(io.BytesIO(data), max_duration=60, sandbox=ProbeLimits())
        with pytest.raises(NotAudioError, match=why):
            check_audio_limits(io.BytesIO(data), max_duration=60, sandbox=None)


def _formats(samples: np.ndarray, rate: int) -> dict[str, tuple[bytes, str]]:
    def soundfile(fmt: str, subtype: str, data: np.ndarray = samples, at: int = rate) -> bytes:
        buf = io.BytesIO()
        sf.write(buf, data, at, format=fmt, subtype=subtype)
        return buf.getvalue()

    at_48k = np.repeat(samples, 3)  # 48 kHz for Opus, near enough for a header check
    return {
        "call.mp3": (encode(samples, rate, container="mp3", codec="libmp3lame"), "audio/mpeg"),
        "memo.m4a": (encode(samples, rate, container="mp4", codec="aac"), "audio/mp4"),
        "raw.aac": (encode(samples, rate, container="adts", codec="aac"), "audio/aac"),
        "live.webm": (_written(at_48k, 48000, "webm", "libopus", options={"live": "1"}), "audio/webm"),
        "voice.opus": (encode(at_48k, 48000, container="ogg", codec="libopus"), "audio/ogg"),
        "vorbis.ogg": (soundfile("OGG", "VORBIS"), "audio/ogg"),
        "archive.flac": (soundfile("FLAC", "PCM_16"), "audio/flac"),
        "eight-bit.wav": (soundfile("WAV", "PCM_U8"), "audio/wav"),
        "float.wav": (soundfile("WAV", "FLOAT"), "audio/wav"),
        "mulaw.wav": (soundfile("WAV", "ULAW"), "audio/wav"),
        "truncated.wav": (soundfile("WAV", "PCM_16")[: 44 + rate], "audio/wav"),
        "phone.amr": (_written(samples[::2], 8000, "amr", "libopencore_amrnb"), "audio/amr"),
        "video.mp4": (_written(samples, rate, "mp4", "aac", video=True), "video/mp4"),
        "video.webm": (_written(at_48k, 48000, "webm", "libopus", video=True), "video/webm"),
        "track.mkv": (_written(samples, rate, "matroska", "aac"), "audio/x-matroska"),
    }


def test_the_formats_users_upload_still_pass(client, utterances):
    samples, rate = _speech(utterances)
    for name, (data, mime) in _formats(samples, rate).items():
        for sandbox in (ProbeLimits(), None):
            info = check_audio_limits(io.BytesIO(data), max_duration=3600, sandbox=sandbox)
            assert info is not None and info.sample_rate in (8000, 16000, 48000), (name, info)
        r = client.post("/jobs/embedding", files={"file": (name, data, mime)})
        assert r.status_code == 202, (name, r.text)
        client.post(f"/jobs/{r.json()['job_id']}/cancel")


# --- B. the synchronous 413's hint, however the length was found -----------------------------------


def _live_webm(seconds: int, rate: int = 16000) -> bytes:
    """``seconds`` of Opus in WebM as a browser's MediaRecorder writes it (``live``: no duration,
    no cues): 10 s of a tone, then silence. The silence is encoded once and its packets written
    again, moved on, so building 30 min takes under a second."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm", options={"live": "1"}) as out:
        stream = out.add_stream("libopus", rate=rate, layout="mono")
        stream.bit_rate = 6000
        tone = (np.sin(2 * np.pi * 220 * np.arange(rate * 10) / rate) * 0.3).astype(np.float32)
        silent = []
        for i, block in enumerate((tone, np.zeros(rate * 10, np.float32))):
            frame = av.AudioFrame.from_ndarray(block[None], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i * rate * 10
            for packet in stream.encode(frame):
                if i == 1:
                    silent.append(packet)
                out.mux(packet)
        step = silent[-1].pts + silent[-1].duration - silent[0].pts
        for n in range(1, (seconds - 20) // 10 + 1):
            for packet in silent:
                again = av.Packet(bytes(packet))
                again.stream, again.time_base = stream, packet.time_base
                again.pts = again.dts = packet.pts + n * step
                again.duration = packet.duration
                out.mux(again)
    return buf.getvalue()


def test_a_synchronous_413_found_while_decoding_has_the_hint(client, settings):
    data = _live_webm(35 * 60)
    info = probe(io.BytesIO(data))
    assert info is not None and info.duration is None, info  # the header states no length
    assert settings.sync_max_audio_seconds < 35 * 60 < settings.max_audio_seconds
    r = client.post("/embedding", files={"file": ("long35.webm", data, "audio/webm")}, timeout=120)
    error = _assert_error(r, 413)
    assert error["detail"] == (f"audio is longer than the limit of {settings.sync_max_audio_seconds:.0f} s"
                               f"{SYNC_HINT}"), error


def test_the_hint_is_the_one_the_header_check_gives(client, settings, utterances):
    """Stated in the header: the API's own 413, with the same hint (the words both share)."""
    samples, rate = _speech(utterances)
    long = np.zeros(int((settings.sync_max_audio_seconds + 60) * rate), np.float32)
    long[: len(samples)] = samples  # silence after the speech: a FLAC of a few hundred KB
    buf = io.BytesIO()
    sf.write(buf, long, rate, format="FLAC", subtype="PCM_16")
    error = _assert_error(client.post("/embedding", files={"file": ("long.flac", buf.getvalue(), "audio/flac")}), 413)
    assert error["detail"].endswith(SYNC_HINT), error


def test_a_batch_names_its_file_that_is_too_long_or_too_low_a_rate(variant_app, utterances):
    """Of several files, the one over a limit is named, as a file that is not audio is: a batch
    of 40 answered "audio is 7300 s long; the limit is ..." left the caller to find which. A
    single upload keeps the bare words (nothing to tell apart)."""
    conversation = utterances["spk1"][0].read_bytes()
    seconds = sf.info(utterances["spk1"][0]).duration
    tone = io.BytesIO()
    sf.write(tone, np.zeros(2000, dtype=np.int16) + 100, 2000, format="WAV", subtype="PCM_16")
    short = variant_app(max_audio_seconds=seconds + 1)
    long_wav = io.BytesIO()
    sf.write(long_wav, np.zeros(int(16000 * (seconds + 5)), dtype=np.int16) + 100, 16000, format="WAV", subtype="PCM_16")
    r = short.post("/jobs/batch", data={"kind": "embedding"}, files=[
        ("files", ("ok.wav", conversation, "audio/wav")), ("files", ("long.wav", long_wav.getvalue(), "audio/wav"))])
    assert _assert_error(r, 413)["detail"].startswith("uploaded file 'long.wav': audio is "), r.text
    r = short.post("/jobs/batch", data={"kind": "embedding"}, files=[
        ("files", ("ok.wav", conversation, "audio/wav")), ("files", ("phone.wav", tone.getvalue(), "audio/wav"))])
    error = _assert_error(r, 415)
    assert error["detail"].startswith("uploaded file 'phone.wav': sample rate 2000 Hz is below"), error
    r = short.post("/jobs/embedding", files={"file": ("long.wav", long_wav.getvalue(), "audio/wav")})
    assert _assert_error(r, 413)["detail"].startswith("audio is "), r.text
