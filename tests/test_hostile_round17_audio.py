"""Hostile audio, round 17: lengths that FFmpeg estimates or takes from a field anyone can write,
of formats earlier rounds left alone.

- AMR changes its bitrate frame by frame, and discontinuous transmission (DTX, as phones send a
  call) writes a 6-byte comfort-noise frame (SID) or a 1-byte empty one (NO_DATA) for each 20 ms
  of a pause. FFmpeg estimates an AMR file's length from the bitrate of the frames it read while
  opening it: 31 s of speech with DTX pauses read as 109 s (refused by a limit of 60 s), a 10 min
  call that opened on 2 s of DTX silence as 2,743 s (refused by a synchronous call's 1800 s), and
  1 s at 12.2 kbps before 600 s at 4.75 kbps passed as 326 s. And FFmpeg's own AMR decoders drop
  SID and NO_DATA frames as errors, so the pauses vanished from the decoded audio: the 31 s
  decoded to 16.2 s, every turn after the first pause reported seconds early. Frames are counted
  now (each is 20 ms: ``amr_length``), and decoded by the 3GPP reference decoders
  (libopencore-amr, in PyAV's wheels), which decode a pause as the comfort noise it describes.

- A CAF's length is its description's frames per packet times its packets (of its packet table,
  or of its data size at a constant bitrate), and a RealMedia file's its stream header's duration:
  fields anyone can write. 70 s of ALAC or IMA ADPCM in CAF, or of AC-3 or RealAudio 14.4 in RM,
  said 1 s with one field rewritten, passed the header check (API and worker) as 1 s (a job's
  duration budget and the time limit of 1 s) and decoded whole. They are held to it now, as WAV,
  AIFF-C, AVI, ASF, MP4, Matroska, WavPack and FLV are: refused (415) past twice that and a
  minute. A duration of 0 (FFmpeg's own RM muxer writes it for RealAudio 14.4) is no length.

- An MPEG transport or program stream carries no length: FFmpeg takes the span of its timestamps,
  and a clock that jumps (a broadcast recording across a programme change, recordings joined
  with cat) makes it anything: 40 s read as 36,020 s and was refused by a synchronous call (413).
  A span longer than the file's bytes could hold at the codec's own bitrate is no length now.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from engine.audio import SAMPLE_RATE, load_audio, resample
from evaluation.encoding import encode
from shared.audio_limits import amr_length, check_audio_limits
from shared.errors import AudioDecodeError, AudioTooLongError
from tests.conftest import failed_job_error


# --- A. AMR: counted, and its DTX pauses decoded -------------------------------------------------


def _tone(seconds: float, rate: int = 8000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _amr(samples: np.ndarray, bit_rate: int = 12200, dtx: bool = False, container: str = "amr") -> bytes:
    """8 kHz ``samples`` as an AMR-NB file (RFC 4867 storage format; "3gp": a phone's recording),
    with DTX where asked."""
    return encode(samples, 8000, container=container, codec="libopencore_amrnb", bit_rate=bit_rate,
                  options={"dtx": "1"} if dtx else None)


def _speech_with_pauses(utterances: dict[str, list[Path]]) -> np.ndarray:
    """One talker's six utterances at 8 kHz, after 3 s of silence and each followed by 2 s of it
    (31.2 s)."""
    parts = [np.zeros(3 * 8000, np.float32)]
    for path in utterances["spk1"]:
        x, rate = sf.read(path, dtype="float32")
        parts += [resample(x, rate, 8000).astype(np.float32), np.zeros(2 * 8000, np.float32)]
    return np.concatenate(parts)


def _loud_spans(samples: np.ndarray, threshold: float = 0.01) -> list[tuple[float, float]]:
    """Where ``samples`` (16 kHz) are louder than ``threshold`` in 20 ms windows, merged across
    gaps under 0.5 s: the speech, seen from the decoded audio."""
    hop = SAMPLE_RATE // 50
    rms = np.sqrt(np.mean(samples[: len(samples) // hop * hop].astype(np.float32).reshape(-1, hop) ** 2, axis=1))
    spans: list[list[float]] = []
    for i in np.flatnonzero(rms > threshold):
        t = i / 50
        if spans and t - spans[-1][1] < 0.5:
            spans[-1][1] = t + 0.02
        else:
            spans.append([t, t + 0.02])
    return [(a, b) for a, b in spans]


@pytest.mark.parametrize("container", ["amr", "3gp"])
def test_an_amr_call_with_dtx_pauses_keeps_its_pauses_and_its_length(utterances, container: str) -> None:
    """31.2 s of speech with pauses, encoded with DTX (642 NO_DATA and 107 SID frames of 1559):
    before, 109 s at the header check of the .amr (refused by a limit of 60 s; the 3GP's header
    said 31.2 s) and 16.2 s decoded from either, each utterance after the first pause moved
    earlier. Now 31.2 s at both, and each utterance is where it was spoken."""
    samples = _speech_with_pauses(utterances)
    data = _amr(samples, dtx=True, container=container)
    length = len(samples) / 8000
    info = check_audio_limits(io.BytesIO(data), max_duration=60.0)
    assert info.duration == pytest.approx(length, abs=0.05)
    audio = load_audio(data)
    assert audio.duration == pytest.approx(length, abs=0.05)
    spoken = _loud_spans(resample(samples, 8000, SAMPLE_RATE))
    found = _loud_spans(audio.samples)
    assert len(spoken) == 6 and len(found) == len(spoken), (spoken, found)
    for (start, end), (was_start, was_end) in zip(found, spoken):
        assert start == pytest.approx(was_start, abs=0.1) and end == pytest.approx(was_end, abs=0.1)


def test_an_amr_files_length_is_its_frames_not_an_estimate_from_its_first() -> None:
    """AMR's bitrate changes frame by frame: 2 s of DTX silence (NO_DATA frames) before 120 s of
    12.2 kbps read as 548 s, and 1 s at 12.2 kbps before 120 s at 4.75 kbps as 66 s. Counted, each
    is its 20 ms frames: what the decoder makes of it."""
    speech = _amr(_tone(120.0))
    quiet_start = speech[:6] + b"\x7c" * 100 + speech[6:]
    joined = _amr(_tone(1.0)) + _amr(_tone(120.0), bit_rate=4750)[6:]
    for data, length in ((quiet_start, 122.0), (joined, 121.0)):
        declared = check_audio_limits(io.BytesIO(data), max_duration=3600.0).duration
        assert declared == pytest.approx(length, abs=0.1)
        assert load_audio(data).duration == pytest.approx(declared, abs=0.03)
    # past the caller's limit the count stops, and says so
    with pytest.raises(AudioTooLongError, match="over 60 s"):
        check_audio_limits(io.BytesIO(joined), max_duration=60.0)
    # a last frame cut short is no packet to FFmpeg's demuxer, nor a frame to the count
    assert amr_length(io.BytesIO(speech[:-5])).seconds == pytest.approx(amr_length(io.BytesIO(speech)).seconds - 0.02)


def test_amr_wb_frames_are_counted_as_ffmpeg_reads_them() -> None:
    """AMR-WB (16 kHz, 320 samples a frame) has frame sizes of its own: 100 frames of 12.65 kbps,
    500 NO_DATA and 100 of 23.85 kbps are 14 s, as FFmpeg's demuxer and the decoder make them.
    No AMR-WB encoder is at hand: the decoder takes any bits of a frame's size."""
    rng = np.random.default_rng(17)

    def frames(kind: int, size: int, count: int) -> bytes:
        return b"".join(bytes([(kind << 3) | 4]) + rng.integers(0, 256, size - 1, dtype=np.uint8).tobytes()
                        for _ in range(count))

    data = b"#!AMR-WB\n" + frames(2, 33, 100) + frames(15, 1, 500) + frames(8, 61, 100)
    info = check_audio_limits(io.BytesIO(data), max_duration=3600.0)
    assert (info.duration, info.sample_rate) == (pytest.approx(14.0), 16000)
    assert load_audio(data, reject_silence=False).duration == pytest.approx(14.0)


def test_a_stream_without_a_decoder_is_still_a_415_not_a_500(client) -> None:
    """An MP4 cut off before its sample description: FFmpeg opens an audio stream it has no
    codec context for, which the header check leaves unread (None) and the decoder answers for.
    Choosing AMR's decoder read the missing context's name: AttributeError, a job failed as an
    internal error (500), where it had failed as "audio stream holds no samples" (415)."""
    whole = encode(_tone(4.0, 16000), 16000, container="mp4", codec="aac")
    cut = whole[: whole.find(b"stsd") - 4]
    with pytest.raises(AudioDecodeError, match="holds no samples"):
        load_audio(cut)
    error = failed_job_error(client, "/jobs/embedding", {"file": ("cut.m4a", cut, "audio/mp4")})
    assert error["status_code"] == 415, error


def test_a_synchronous_call_takes_an_amr_call_with_dtx_whole(variant_app, utterances) -> None:
    """Through the API (its synchronous limit at 60 s) and the session's real worker: the 31.2 s
    DTX call was refused at submit (413, "audio is 109 s long"); now it is embedded whole."""
    samples = _speech_with_pauses(utterances)
    api = variant_app(sync_max_audio_seconds=60.0)
    r = api.post("/embedding", files={"file": ("call.amr", _amr(samples, dtx=True), "audio/amr")})
    assert r.status_code == 200, r.text
    assert r.json()["audio_duration"] == pytest.approx(len(samples) / 8000, abs=0.05)


# --- B. CAF and RealMedia: the length their header states is held to ----------------------------


def _caf(seconds: float, codec: str, *, frames_per_packet: int | None = None) -> bytes:
    """``seconds`` of a tone in CAF as FFmpeg writes it (``codec`` "alac" or "adpcm_ima_qt"), its
    description's frames per packet rewritten to ``frames_per_packet`` where given: the one field
    FFmpeg's length is the product of (with the packets of its packet table, or of its data size)."""
    data = bytearray(encode(_tone(seconds, 16000), 16000, container="caf", codec=codec))
    at = data.find(b"desc") + 12 + 8 + 4 + 4 + 4  # size, rate, format, flags, bytes per packet
    if frames_per_packet is not None:
        data[at : at + 4] = frames_per_packet.to_bytes(4, "big")
    return bytes(data)


def _rm(seconds: float, codec: str, rate: int, *, duration_ms: int | None = None) -> bytes:
    """``seconds`` of a tone in RealMedia as FFmpeg writes it (``codec`` "ac3" or "ra_144"), its
    properties' and stream header's durations rewritten to ``duration_ms`` where given."""
    data = bytearray(encode(_tone(seconds, rate), rate, container="rm", codec=codec))
    if duration_ms is not None:
        # PROP: id, size, version, then max and average bitrate, max and average packet size,
        # packets, duration; MDPR: id, size, version, stream number, those four, start time,
        # preroll, duration
        for chunk, at in ((b"PROP", 4 + 4 + 2 + 5 * 4), (b"MDPR", 4 + 4 + 2 + 2 + 6 * 4)):
            where = data.find(chunk) + at
            data[where : where + 4] = duration_ms.to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize("forge", [
    lambda: _caf(70.0, "alac", frames_per_packet=64),  # of 4096
    lambda: _caf(70.0, "adpcm_ima_qt", frames_per_packet=1),  # of 64
    lambda: _rm(70.0, "ac3", 48000, duration_ms=1000),
    lambda: _rm(70.0, "ra_144", 8000, duration_ms=1000),
], ids=["caf-alac", "caf-ima", "rm-ac3", "rm-ra144"])
def test_a_caf_or_rm_whose_header_understates_its_length_is_refused_as_it_decodes(forge) -> None:
    """70 s whose header says about 1 s: 1 s at the header check (a job's duration budget and
    time limit), then decoded whole. Refused now past 2 x 1 s + 60 s, as a forged WAV or MP4 is."""
    forged = forge()
    assert check_audio_limits(io.BytesIO(forged), max_duration=3600.0).duration == pytest.approx(1.0, abs=0.1)
    with pytest.raises(AudioDecodeError, match="decodes to more than its header declares") as refused:
        load_audio(forged)
    assert refused.value.status_code == 415


@pytest.mark.parametrize("honest", [
    lambda: _caf(70.0, "alac"), lambda: _caf(70.0, "adpcm_ima_qt"), lambda: _rm(70.0, "ac3", 48000),
], ids=["caf-alac", "caf-ima", "rm-ac3"])
def test_honest_caf_and_rm_files_decode_whole(honest) -> None:
    data = honest()
    declared = check_audio_limits(io.BytesIO(data), max_duration=3600.0).duration
    assert declared == pytest.approx(70.0, abs=0.05)
    assert load_audio(data).duration == pytest.approx(declared, abs=0.05)


def test_a_realmedia_stream_that_states_no_length_is_unknown_not_0_s() -> None:
    """FFmpeg's own RM muxer writes a duration of 0 for RealAudio 14.4: 0.0 s at the header check
    (nothing in a job's duration budget, the floor of its time limit). Unknown now, so the job is
    given the limit's time, and it decodes to its end."""
    data = _rm(70.0, "ra_144", 8000)
    assert check_audio_limits(io.BytesIO(data), max_duration=3600.0).duration is None
    assert load_audio(data).duration == pytest.approx(70.0, abs=0.05)


def test_a_forged_caf_fails_its_job_with_a_415(client) -> None:
    """Through the API (202: its header says 1 s) and the session's real worker: the job fails in
    the documented shape, a 415, rather than analysing 70 s under the time limit of its 1 s."""
    error = failed_job_error(client, "/jobs/embedding",
                             {"file": ("forged.caf", _caf(70.0, "adpcm_ima_qt", frames_per_packet=1), "audio/x-caf")})
    assert error["status_code"] == 415, error
    assert "decodes to more than its header declares" in error["detail"], error


# --- C. MPEG transport and program streams: a span of timestamps that jumps is no length --------


def _mpeg(samples: np.ndarray, rate: int, *, starts_at_s: float, container: str = "mpegts") -> bytes:
    """``samples`` as MP2 in an MPEG transport (or program) stream whose timestamps start at
    ``starts_at_s``, as a recorder's clock would have them."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream("mp2", rate=rate, layout="mono")
        for start in range(0, len(samples), 4608):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[None, start : start + 4608]),
                                               format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start + int(starts_at_s * rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize("container", ["mpegts", "mpeg"])
@pytest.mark.parametrize("second_at_s", [36_000.0, -1.0], ids=["jumps-on", "jumps-back"])
def test_mpeg_streams_whose_timestamps_jump_have_no_length_not_hours(container: str, second_at_s: float) -> None:
    """20 s of MP2 in MPEG-TS (or PS) and 20 s behind it whose clock stands 10 h on (or started
    again): FFmpeg's length is the span of the timestamps, 36,020 s (59,464 s where the clock went
    back), refused by a synchronous call (413) and a job's time limit for 10 h. Bytes at the
    codec's 160 kbps hold 48 s at most: the length is unknown now, and the file decodes whole.
    One whose clock runs on keeps its length."""
    tone = _tone(20.0, 16000)
    first = 1.0 if second_at_s >= 0 else 36_000.0
    second = second_at_s if second_at_s >= 0 else 1.0
    joined = _mpeg(tone, 16000, starts_at_s=first, container=container) \
        + _mpeg(tone, 16000, starts_at_s=second, container=container)
    assert check_audio_limits(io.BytesIO(joined), max_duration=1800.0).duration is None
    assert load_audio(joined).duration == pytest.approx(40.0, abs=0.1)
    running_on = _mpeg(tone, 16000, starts_at_s=1.0, container=container) \
        + _mpeg(tone, 16000, starts_at_s=21.0, container=container)
    assert check_audio_limits(io.BytesIO(running_on), max_duration=1800.0).duration == pytest.approx(40.0, abs=0.1)


def test_a_synchronous_call_takes_a_transport_stream_whose_clock_jumped(client, utterances) -> None:
    """Through the API and the session's real worker: a recording of speech in MPEG-TS whose
    clock jumped 10 h was refused at submit (413, "audio is 36011 s long; the limit is 1800 s");
    now it is embedded, its whole length."""
    speech = np.concatenate([sf.read(path, dtype="float32")[0] for path in utterances["spk1"]])
    half = len(speech) // 2
    joined = _mpeg(speech[:half], 16000, starts_at_s=1.0) + _mpeg(speech[half:], 16000, starts_at_s=36_000.0)
    r = client.post("/embedding", files={"file": ("dvr.ts", joined, "video/mp2t")})
    assert r.status_code == 200, r.text
    assert r.json()["audio_duration"] == pytest.approx(len(speech) / 16000, abs=0.2)  # an MP2 frame a part


# --- D. audio by URL: a part of a file is not the file ----------------------------------------------


def test_a_url_answering_with_part_of_the_file_fails_its_job(client, media_server, utterances) -> None:
    """The worker sends no Range, so a 206 Partial Content is a part the server chose: the first
    half of a WAV of speech (its header stating the whole) passed the header checks and was
    analysed as the whole recording. The job fails now with a 422 naming the answer."""
    whole = utterances["spk1"][0].read_bytes()
    part = whole[: len(whole) // 2]
    url = media_server.route("/part.wav", lambda h: h.answer(206, part, "audio/wav",
                                                             {"Content-Range": f"bytes 0-{len(part) - 1}/{len(whole)}"}))
    error = failed_job_error(client, "/jobs/embedding", {"file_url": (None, url)})
    assert error["status_code"] == 422, error
    assert "answered 206 Partial Content" in error["detail"], error


# --- E. a gap in the packets' times is a pause, not nothing ------------------------------------


def _with_gap(gap_s: float, utterances: dict[str, list[Path]], container: str = "webm", codec: str = "libopus",
              frame: int = 960) -> tuple[bytes, float]:
    """Two talkers' utterances at 48 kHz in ``container``, back to back, then the second one's
    packets stamped ``gap_s`` later, nothing written between them (a WebRTC recorder during DTX,
    a muted track); and where the second begins (seconds). ``frame``: the codec's frame size."""
    rate = 48000
    first, second = (resample(sf.read(path, dtype="float32")[0], 16000, rate).astype(np.float32)
                     for path in (utterances["spk1"][0], utterances["spk2"][0]))
    first = np.concatenate([first, np.zeros(-len(first) % frame, np.float32)])
    speech = np.concatenate([first, second])
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        whole = av.AudioFrame.from_ndarray(speech[None], format="fltp", layout="mono")
        whole.sample_rate, whole.pts = rate, 0
        for packet in [*stream.encode(whole), *stream.encode(None)]:
            if packet.pts is not None and packet.pts >= len(first):
                packet.pts = packet.dts = packet.pts + int(gap_s * rate)
            out.mux(packet)
    return buf.getvalue(), len(first) / rate + gap_s


# Ogg stamps a page, not each packet (FFmpeg's muxer: a page a second), so a gap is seen at a page's
# start: up to a page early
@pytest.mark.parametrize("container,codec,frame,within_s", [
    ("webm", "libopus", 960, 0.15), ("ogg", "libopus", 960, 1.0), ("mp4", "aac", 1024, 0.15),
    ("mpegts", "mp2", 1152, 0.15),
])
def test_a_pause_left_out_of_the_packets_is_kept(utterances, container: str, codec: str, frame: int,
                                                 within_s: float) -> None:
    """A 3 s gap between two talkers' packets: the header said 3 s more than was decoded (7.9 s,
    4.9 s decoded, in each of the four), and the second talker began 3 s early in the decoded audio (the
    samples taken back to back). The gap is decoded as silence now: the length is the header's
    and the second talker starts where his packets' times put him. (Ogg is read by libsndfile,
    which takes no notice of the gap: short of its header's length, it is read again by FFmpeg.)"""
    data, second_at = _with_gap(3.0, utterances, container, codec, frame)
    declared = check_audio_limits(io.BytesIO(data), max_duration=600.0).duration
    audio = load_audio(data)
    assert audio.duration == pytest.approx(declared, abs=0.05)
    spans = _loud_spans(audio.samples)
    assert len(spans) == 2, spans
    assert spans[1][0] == pytest.approx(second_at, abs=within_s)


def test_a_jump_of_more_than_a_minute_is_left_as_it_was(utterances) -> None:
    """Recordings joined, a clock reset: nothing is invented for a jump past a minute."""
    data, _ = _with_gap(120.0, utterances)
    together, _ = _with_gap(0.0, utterances)
    assert load_audio(data).duration == pytest.approx(load_audio(together).duration, abs=0.05)


def test_a_pause_left_out_of_an_8_channel_stream_does_not_kill_the_decoder(tmp_path) -> None:
    """7.1 AAC in MP4 (FFmpeg's AAC decoder gives planar frames) with a 3 s gap: the silence was
    first built from the decoded frame's own array, and to_ndarray of a planar frame of 8 channels
    reads past its planes (PyAV 18.1): the decoding process died of SIGSEGV (exit -11), a worker
    lost with its job. Decoded in a process of its own here, it now gives its 5 s."""
    rate, tone = 48000, _tone(1.0, 48000)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate, layout="7.1")
        packets = []
        for second in range(2):
            # packed: PyAV cannot build a planar frame of 8 channels either
            frame = av.AudioFrame.from_ndarray(np.repeat(tone, 8)[None], format="flt", layout="7.1")
            frame.sample_rate, frame.pts = rate, second * rate
            packets += list(stream.encode(frame))
        for packet in [*packets, *stream.encode(None)]:
            if packet.pts is not None and packet.pts >= rate:
                packet.pts = packet.dts = packet.pts + 3 * rate
            out.mux(packet)
    path = tmp_path / "film.m4a"
    path.write_bytes(buf.getvalue())
    code = f"import engine.audio as a; print(a.load_audio({str(path)!r}, reject_silence=False).duration)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(5.0, abs=0.05)
