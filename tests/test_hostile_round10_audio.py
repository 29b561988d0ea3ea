"""Hostile audio, round 10: lengths that headers declare against what the files decode to, in
formats earlier rounds did not hold to them; comments FFmpeg reads in quadratic time; and valid
recordings (joined with ``cat``, channels in opposite polarity) that were analysed wrongly.

- WavPack: every block's header carries the file's total samples, and FFmpeg takes the first
  block's for the file's length but decodes every block there is. A 1.4 MB WavPack of 24 h of DC
  whose first block said 1 s passed the API as 1 s; a synchronous request decoded 30 min of it
  before its 413, and a job, its time limit 601 s for its "1 s", decoded all 24 h (21 s of CPU,
  5.1 GB of RSS as the buffer grew from 2 s) for the engine to run past that limit (504). It is
  now held to its declared length as MP4, Matroska and an MP3's Xing count are (round 5): refused
  (415) as soon as it decodes past twice that and a minute.
- FLV: the same with its onMetaData duration, which FFmpeg takes for the file's length: 300 s of
  AAC whose metadata said 1 s passed as 1 s and decoded whole. Held to it where the metadata
  states one; an FLV without (a live writer's 0, none at all: FFmpeg then goes by the last tag's
  timestamp, which a live recording may restart) decodes to its end as before.
- MP3s joined end to end (``cat``): the header check read libsndfile's length, the first MP3's
  Xing count, where the decoder reads what FFmpeg reads, every MP3 of them. A 1 s MP3 and 2 h of
  8 kbps behind it (7 MB) passed the API and the worker's header check as 1 s and decoded to
  7201 s: its job was held to 601 s (a day behind it needs some 18 min of a CPU engine), and an
  enrollment's files each counted their first second in its duration budget. FFmpeg's own length
  is an estimate from the first frames' bitrate (400 s at 8 kHz and 400 s at 48 kHz joined: 3600
  s), so such a file's length is now unknown at submit, as an uncountable ADTS stream's is: the
  decoder holds it to the limit, and its job gets the limit's time.
- Chained Ogg whose links change sample rate or channels (recordings joined with ``cat``): FFmpeg's
  Ogg demuxer stops at such a link (AVERROR_PATCHWELCOME), and the decoder fell back on
  libsndfile, which reads the first link alone: 5 s of Vorbis at 8 kHz and 5 s at 48 kHz, or a
  mono and a stereo recording, were analysed as their first 5 s without a word, and a silent
  first link (a recorder's pre-roll) with the speech behind it failed its job as "audio is silent"
  (422). libsndfile now decodes such a chain link by link, each resampled and down-mixed on its
  own; a link it cannot decode (more than MAX_CHANNELS: round 6) ends the decode there.
- Ogg files joined whose streams have the same serial number (``cat a.ogg a.ogg``, a writer that
  numbers every stream alike): the chain test compared the first page's stream with the last
  page's, found them the same, and libsndfile decoded the first file alone (4 s of 8, without a
  word). The decoder now searches the file for a second link where they are the same.
- Ogg comment headers: FFmpeg adds each comment to a dictionary it searches from its start, so a
  Vorbis header of 40,000 short comments (a 480 KB upload) took 12.6 s of the worker's CPU to
  decode where the file is a chain (the decoder gives chains to FFmpeg; 10,000: 0.5 s;
  quadratic, so a 16 MB header hours), under a job time limit of hours for a chain's unknown
  length, and libsndfile, which reads an Ogg's header in the API's own process, held twice a
  comment's size (a 100 MB one: 204 MB; 1 GB would take the API past its 2 GB). More than 4096
  comments in a header (an audiobook of 999 chapters has 1998; 4096 cost FFmpeg 0.27 s), or a header over 16 MB, is refused: each stream's of the first link at
  submit (a second stream beside the first, a skeleton's or a video's before the audio, was not
  looked at), every link's before the worker's decoder reads a chain.
- Channels that cancel in their mean: a voice on left and right in opposite polarity (a balanced
  microphone cable with one leg reversed, a mono signal written L/-R) down-mixed to exact zeros,
  or to a lossy codec's residue under -80 dBFS (MP3, AAC, Opus alike), and the recording was
  refused as "audio is silent" (422). Such a file is now decoded again, its first channel alone.
- Streams that appear mid-file: PyAV (18.1) flushes at the end of a file by the streams the
  container has then, with a table of those it had when demuxing began, and raised IndexError
  when a stream had appeared since (an MPEG-TS whose middle holds a program of 30 more streams,
  two captures joined; an FLV's first video tag): the job failed as an internal error (500)
  after decoding the whole file. The decode is kept now.

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
import soundfile as sf

from engine.audio import load_audio
from shared.audio_limits import check_audio_limits, probe
from shared.errors import AudioDecodeError, InputError

from tests.conftest import failed_job_error, wait_for_job

# the documented error body (an HTTP error's; a failed job's adds its status code)
ERROR_KEYS = {"detail", "error_type", "timestamp"}


def _tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _encode(samples: np.ndarray, rate: int, container: str, codec: str, *, bit_rate: int | None = None,
            metadata: dict[str, str] | None = None) -> bytes:
    """``samples`` ((frames,) or (frames, 2) float32) encoded by FFmpeg in blocks of 10 s
    (evaluation.encoding's frames of 4608 samples made a minute of WavPack 200 blocks), with the
    stream's ``metadata`` (an Ogg's comments) where given."""
    layout = "mono" if samples.ndim == 1 else "stereo"
    planar = samples.reshape(len(samples), -1).T
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if bit_rate:
            stream.bit_rate = bit_rate
        for key, value in (metadata or {}).items():
            stream.metadata[key] = value
        step = 10 * rate
        for start in range(0, len(samples), step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, start : start + step]), format="fltp",
                                               layout=layout)
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
    error = failed_job_error(client, "/jobs/embedding",
                             {"file": ("forged.wv", _wavpack(70.0, total=16000), "audio/x-wavpack")})
    assert error["status_code"] == 415, error
    assert "decodes to more than its header declares" in error["detail"], error


# --- FLV: the onMetaData duration ---------------------------------------------------------------

def _flv(seconds: float, duration: float | None) -> bytes:
    """``seconds`` of AAC in FLV, its onMetaData duration rewritten to ``duration`` where given."""
    data = bytearray(_encode(_tone(seconds, 16000), 16000, "flv", "aac"))
    at = data.find(b"\x00\x08duration\x00")
    assert at > 0 and struct.unpack(">d", data[at + 11 : at + 19])[0] == pytest.approx(seconds, abs=0.1)
    if duration is not None:
        data[at + 11 : at + 19] = struct.pack(">d", duration)
    return bytes(data)


def test_an_flv_decoding_far_past_its_metadata_duration_is_refused() -> None:
    """70 s of AAC in FLV whose onMetaData says 1 s: 1 s at the header check, 70 s decoded.
    Refused past 2 x 1 s + 60 s now; the honest file and one whose metadata says 0 (a live
    writer's) decode to their end."""
    forged = _flv(70.0, 1.0)
    assert check_audio_limits(io.BytesIO(forged), max_duration=20.0).duration == pytest.approx(1.0)
    with pytest.raises(AudioDecodeError, match="decodes to more than its header declares"):
        load_audio(forged)
    assert load_audio(_flv(70.0, None)).duration == pytest.approx(70.0, abs=0.1)
    assert load_audio(_flv(70.0, 0.0)).duration == pytest.approx(70.0, abs=0.1)


# --- MP3s joined end to end: libsndfile's length is the first one's ---------------------------------

def _mp3(seconds: float, rate: int = 8000) -> bytes:
    """``seconds`` of tone as FFmpeg's LAME writes it: a Xing/Info header counting its frames."""
    data = _encode(_tone(seconds, rate), rate, "mp3", "libmp3lame", bit_rate=8000)
    assert b"Xing" in data[:2048] or b"Info" in data[:2048]
    return data


@pytest.mark.parametrize("sandboxed", [True, False], ids=["sandbox", "in-process"])
def test_mp3s_joined_end_to_end_have_no_length_at_submit(tmp_path, settings, monkeypatch, sandboxed: bool) -> None:
    """1 s of MP3 and 100 s behind it: the header check (the API's on the upload, the worker's on
    its path) said 1 s, the decoder decodes 101 s. The length is unknown now; an MP3 alone keeps
    its length, and where its Xing header counts the file's bytes FFmpeg is not asked."""
    sandbox = settings.probe_limits() if sandboxed else None
    assert sandbox is not None or not sandboxed
    alone = _mp3(100.0)
    joined = _mp3(1.0) + alone
    path = tmp_path / "joined.mp3"
    path.write_bytes(joined)
    for source in (io.BytesIO(joined), path):
        info = check_audio_limits(source, max_duration=20.0, sandbox=sandbox)
        assert info is not None and info.sample_rate == 8000 and info.duration is None, info
    assert load_audio(joined).duration == pytest.approx(101.0, abs=0.2)

    class Asked(BaseException):  # not an Exception: nothing on the way may take it for FFmpeg's refusal
        pass

    def unasked(*args, **kwargs):
        raise Asked("FFmpeg was asked about an MP3 whose Xing header counts the whole file")

    monkeypatch.setattr("shared.probe_sandbox.read_header", unasked)
    monkeypatch.setattr("shared.audio_limits.ffmpeg_header", unasked)
    for source in (io.BytesIO(alone), io.BytesIO(b"ID3\x04\0\0\0\0\0\x10" + bytes(16) + alone)):
        assert check_audio_limits(source, max_duration=200.0, sandbox=sandbox).duration == pytest.approx(100.0, abs=0.1)


# --- chained Ogg whose links change rate or channels ------------------------------------------------

def _ogg(samples: np.ndarray, rate: int, subtype: str) -> bytes:
    """One Ogg file (a link) of ``samples`` ((frames,) or (frames, channels)) by libsndfile,
    written a second at a time (libsndfile's Vorbis encoder crashed on a long array at once)."""
    buf = io.BytesIO()
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    with sf.SoundFile(buf, "w", rate, channels, format="OGG", subtype=subtype) as out:
        for start in range(0, len(samples), rate):
            out.write(samples[start : start + rate])
    return buf.getvalue()


def _sine(hz: float, seconds: float, rate: int) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def _peak_hz(samples: np.ndarray) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(samples)))) * 16000 / len(samples)


@pytest.mark.parametrize("subtype, first, second", [
    ("VORBIS", (8000, 1), (48000, 1)),
    ("VORBIS", (44100, 1), (22050, 2)),
    ("VORBIS", (16000, 2), (16000, 1)),
    ("OPUS", (16000, 1), (16000, 2)),
], ids=["vorbis-8k-48k", "vorbis-44k-mono-22k-stereo", "vorbis-stereo-mono", "opus-mono-stereo"])
def test_a_chain_whose_links_change_rate_or_channels_is_decoded_to_its_end(subtype, first, second) -> None:
    """5 s of a 300 Hz tone, then 5 s of a 1000 Hz one in a link of another rate or channel
    count: decoded as the first 5 s alone. Now 10 s, each link at its own pitch and level."""
    links = []
    for (rate, channels), hz in ((first, 300), (second, 1000)):
        tone = _sine(hz, 5.0, rate)
        links.append(_ogg(tone if channels == 1 else np.repeat(tone[:, None], channels, axis=1), rate, subtype))
    decoded = load_audio(b"".join(links))
    assert decoded.duration == pytest.approx(10.0, abs=0.05)
    samples = decoded.float32()
    assert _peak_hz(samples[16000:64000]) == pytest.approx(300, abs=5)
    tail = samples[-64000:-16000]
    assert _peak_hz(tail) == pytest.approx(1000, abs=5)
    assert np.sqrt(np.mean(tail**2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.1)


def test_a_job_whose_speech_is_in_a_chains_later_link_is_analysed(client, utterances) -> None:
    """A silent first link (2 s of 8 kHz mono, a recorder's pre-roll) and the speech in a stereo
    link behind it, through the API and the session's real worker: the job failed "audio is
    silent" (422), from the first link alone; it now embeds the speech."""
    speech, rate = sf.read(utterances["spk1"][0], dtype="float32")
    chain = _ogg(np.zeros(2 * 8000, np.float32), 8000, "VORBIS") + _ogg(np.repeat(speech[:, None], 2, axis=1), rate,
                                                                         "VORBIS")
    r = client.post("/jobs/embedding", files={"file": ("joined.ogg", chain, "audio/ogg")})
    assert r.status_code == 202, r.text
    done = wait_for_job(client, r.json()["job_id"], 90)
    assert done["status"] == "succeeded", done
    assert done["result"]["audio_duration"] == pytest.approx(2.0 + len(speech) / rate, abs=0.1), done["result"]


def test_ogg_files_joined_whose_streams_share_a_serial_number_decode_to_their_end() -> None:
    """The same 4 s Ogg twice, and three times: decoded as 4 s; each link now, as any chain. The
    header check gives no length for them (it gave one link's, which a job's time limit and the
    synchronous limit followed), as for any chain; one link alone keeps its length."""
    for subtype in ("VORBIS", "OPUS"):
        one = _ogg(_sine(300, 4.0, 16000), 16000, subtype)
        assert load_audio(one).duration == pytest.approx(4.0, abs=0.01)
        assert check_audio_limits(io.BytesIO(one), max_duration=60.0).duration == pytest.approx(4.0, abs=0.01)
        assert check_audio_limits(io.BytesIO(one * 2), max_duration=60.0).duration is None, subtype
        for times in (2, 3):
            # Vorbis links each add their encoder's few ms of priming (round 6)
            assert load_audio(one * times).duration == pytest.approx(4.0 * times, abs=0.05 * times), (subtype, times)


# --- Ogg comment headers ----------------------------------------------------------------------------

def _opus(seconds: float, comments: int = 0, comment_bytes: int = 0) -> bytes:
    """``seconds`` of tone in Ogg Opus by FFmpeg, its OpusTags holding ``comments`` comments
    (k0=v, k1=v, ...) and one of ``comment_bytes`` bytes where given."""
    metadata = {f"k{i}": "v" for i in range(comments)}
    if comment_bytes:
        metadata["cover"] = "a" * comment_bytes
    return _encode(_tone(seconds, 48000), 48000, "ogg", "libopus", metadata=metadata)


def test_an_ogg_of_thousands_of_comments_or_a_huge_one_is_refused_at_submit(client) -> None:
    """5000 comments, or one of 17 MB, in an Opus file's comment header: queued (202). Refused
    (415) in the documented shape now; a tagged file, its cover picture of a few MB included,
    and an audiobook's chapter marks (999 chapters, two comments each) pass the header check."""
    for name, data in (("many.opus", _opus(3.0, comments=5000)), ("huge.opus", _opus(3.0, comment_bytes=17 << 20))):
        r = client.post("/jobs/embedding", files={"file": (name, data, "audio/ogg")})
        assert r.status_code == 415, (name, r.status_code, r.text)
        assert set(r.json()) == ERROR_KEYS, r.text
        assert "comment" in r.json()["detail"] or "header packets" in r.json()["detail"], r.text
    tagged = _opus(3.0, comments=40, comment_bytes=3 << 20)
    assert check_audio_limits(io.BytesIO(tagged), max_duration=20.0).duration == pytest.approx(3.0, abs=0.05)
    book = _opus(3.0, comments=1998)
    assert check_audio_limits(io.BytesIO(book), max_duration=20.0).duration == pytest.approx(3.0, abs=0.05)


def _tone_streams(container: str, codec: str, seconds: float, count: int, setup=lambda streams: None) -> bytes:
    """``seconds`` of a 48 kHz tone in each of ``count`` mono ``codec`` streams multiplexed in one
    ``container`` (FFmpeg's muxer); ``setup(streams)`` sets them up before anything is written."""
    buf = io.BytesIO()
    samples = _tone(seconds, 48000)
    with av.open(buf, mode="w", format=container) as out:
        streams = [out.add_stream(codec, rate=48000, layout="mono") for _ in range(count)]
        setup(streams)
        for start in range(0, len(samples), 48000):
            for stream in streams:
                frame = av.AudioFrame.from_ndarray(samples[None, start : start + 48000].copy(), format="fltp",
                                                   layout="mono")
                frame.sample_rate, frame.pts = 48000, start
                for packet in stream.encode(frame):
                    out.mux(packet)
        for stream in streams:
            for packet in stream.encode(None):
                out.mux(packet)
    return buf.getvalue()


def _two_streams(comments: int) -> bytes:
    """Two Opus streams multiplexed in one Ogg, the second's header holding ``comments``
    comments: FFmpeg reads both streams' headers as it opens the file."""
    def tagged(streams: list) -> None:
        for i in range(comments):
            streams[1].metadata[f"k{i}"] = "v"

    return _tone_streams("ogg", "libopus", 3.0, 2, tagged)


def test_a_second_streams_thousands_of_comments_are_refused_at_submit() -> None:
    """The first stream's header alone was looked at: a second stream beside it (a skeleton or a
    video first, the audio after) held what it liked. Each stream of the first link is checked."""
    with pytest.raises(AudioDecodeError, match="5001 comments"):
        check_audio_limits(io.BytesIO(_two_streams(5000)), max_duration=20.0)
    assert check_audio_limits(io.BytesIO(_two_streams(40)), max_duration=20.0).sample_rate == 48000


def test_a_chain_whose_later_link_holds_thousands_of_comments_is_refused_before_ffmpeg_reads_it() -> None:
    """A clean first link and a second whose header holds 5000 comments: the header check reads
    the first link (and passes the chain, its length unknown), and FFmpeg read every link's
    comments as it decoded the chain. The decoder refuses it now; a chain of tagged links decodes."""
    chain = _opus(3.0) + _opus(3.0, comments=5000)
    assert check_audio_limits(io.BytesIO(chain), max_duration=20.0).duration is None
    with pytest.raises(AudioDecodeError, match="5001 comments"):
        load_audio(chain)
    assert load_audio(_opus(3.0, comments=40) + _opus(3.0, comments=40)).duration == pytest.approx(6.0, abs=0.05)


# --- channels that cancel in their mean ---------------------------------------------------------------

@pytest.mark.parametrize("container, codec", [("wav", "pcm_s16le"), ("flac", "flac"), ("mp3", "libmp3lame"),
                                              ("mp4", "aac")])
def test_a_voice_in_opposite_polarity_on_two_channels_is_not_silence(utterances, container, codec) -> None:
    """Speech on the left channel and its inverse on the right: its mean is zero, or a lossy
    codec's residue, and the recording was refused as silent. Now the first channel is decoded;
    a stereo file silent on both channels is still refused."""
    speech, rate = sf.read(utterances["spk1"][0], dtype="float32")
    data = _encode(np.stack([speech, -speech], axis=1), rate, container, codec)
    decoded = load_audio(data)
    assert decoded.duration == pytest.approx(len(speech) / rate, abs=0.1)
    level = float(np.sqrt(np.mean(decoded.float32() ** 2)))
    assert level == pytest.approx(float(np.sqrt(np.mean(speech**2))), rel=0.2)
    with pytest.raises(InputError, match="audio is silent"):
        load_audio(_encode(np.zeros((5 * rate, 2), np.float32), rate, container, codec))


def test_a_job_of_a_voice_in_opposite_polarity_is_analysed(client, utterances) -> None:
    """The same as an MP3 through the API and the session's real worker: the job failed "audio
    is silent" (422); it now embeds the voice."""
    speech, rate = sf.read(utterances["spk1"][0], dtype="float32")
    data = _encode(np.stack([speech, -speech], axis=1), rate, "mp3", "libmp3lame")
    r = client.post("/jobs/embedding", files={"file": ("inverted.mp3", data, "audio/mpeg")})
    assert r.status_code == 202, r.text
    done = wait_for_job(client, r.json()["job_id"], 90)
    assert done["status"] == "succeeded", done
    assert done["result"]["audio_duration"] == pytest.approx(len(speech) / rate, abs=0.1), done["result"]


# --- streams that appear mid-file ----------------------------------------------------------------------

def _ts(seconds: float, streams: int, bit_rate: int) -> bytes:
    """``seconds`` of a tone in an MPEG-TS of ``streams`` MP2 streams (PIDs 0x100 on)."""
    def rated(outs: list) -> None:
        for stream in outs:
            stream.bit_rate = bit_rate

    return _tone_streams("mpegts", "mp2", seconds, streams, rated)


@pytest.fixture(scope="module")
def joined_ts() -> bytes:
    """110 s of one stream, 1 s of a program of 30 streams (the first on the same PID), 110 s of
    the one stream again: 6.3 MB on either side, past what FFmpeg reads of the file's start and
    end when it opens it, so the 29 other streams appear while it is demuxed."""
    one = _ts(110.0, 1, 384_000)
    assert len(one) > 5_000_000
    return one + _ts(1.0, 30, 64_000) + one


def test_streams_that_appear_mid_file_do_not_fail_the_decode(joined_ts) -> None:
    """The decoder raised IndexError out of PyAV's flush, after the whole file; it is decoded."""
    with av.open(io.BytesIO(joined_ts)) as container:
        assert len(container.streams) == 1  # the premise: the others are not known at open
    assert load_audio(joined_ts).duration == pytest.approx(221.0, abs=0.1)


def test_a_job_whose_file_gains_streams_mid_file_is_analysed(client, joined_ts) -> None:
    """Through the API and the session's real worker: the job failed as an internal error (500);
    it now succeeds, the whole file analysed."""
    r = client.post("/jobs/embedding", files={"file": ("joined.ts", joined_ts, "video/mp2t")})
    assert r.status_code == 202, r.text
    done = wait_for_job(client, r.json()["job_id"], 120)
    assert done["status"] == "succeeded", done
    assert done["result"]["audio_duration"] == pytest.approx(221.0, abs=0.1), done["result"]
