"""Long compressed files are decoded on several cores, and FFmpeg's frames in blocks: the same
samples as one pass, frame by frame; and an MP3 is decoded whole, whatever its bitrate.

libsndfile's seeks land on the exact frame in every format it reads here, so a long file's blocks
are decoded by separate handles side by side and resampled apart
(``engine.audio._decode_in_parallel``). These tests decode the same real speech both ways and ask
for the same floats, bit for bit.
"""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

import engine.audio as audio
from engine.audio import SAMPLE_RATE, load_audio, resample
from evaluation.encoding import encode

SPEECH_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech" / "utterances"
RATE = 44_100


@pytest.fixture(scope="module")
def stereo() -> np.ndarray:
    """75 s of real speech at 44.1 kHz, two channels at different levels, no digital silence."""
    clips = sorted(SPEECH_DIR.glob("*.wav"))
    if not clips:
        pytest.skip(f"no speech clips under {SPEECH_DIR}")
    rng = np.random.default_rng(7)
    pieces = []
    while sum(map(len, pieces)) < 75 * RATE:
        data, rate = sf.read(clips[len(pieces) % len(clips)], dtype="float32")
        pieces.append(resample(data, rate, RATE) * rng.uniform(0.3, 0.9))
    mono = np.concatenate(pieces)[: 75 * RATE]
    mono += 0.003 * rng.standard_normal(len(mono)).astype(np.float32)
    return np.stack([mono, 0.6 * mono], axis=1).astype(np.float32)


def _write(path: Path, data: np.ndarray, fmt: str, subtype: str | None) -> None:
    with sf.SoundFile(path, "w", RATE, data.shape[1], format=fmt, subtype=subtype) as out:
        for start in range(0, len(data), RATE):  # libsndfile's Vorbis writer fails on one long write
            out.write(data[start : start + RATE])


@pytest.fixture()
def long_path(monkeypatch: pytest.MonkeyPatch):
    """Decode 75 s as a long file is decoded (block by block, through libswresample)."""
    monkeypatch.setattr(audio, "_WHOLE_FILE_SAMPLES", 1 << 20)
    calls: list[int] = []
    original = audio._decode_in_parallel

    def spy(snd, reopen, threads, *args, **kwargs):
        calls.append(threads)
        return original(snd, reopen, threads, *args, **kwargs)

    monkeypatch.setattr(audio, "_decode_in_parallel", spy)
    return calls


def _decode(source, monkeypatch: pytest.MonkeyPatch, threads: int) -> np.ndarray:
    monkeypatch.setattr(audio, "_decode_threads", lambda: threads)
    return load_audio(source).samples




@pytest.mark.parametrize(
    ("name", "fmt", "subtype", "keep"),
    [
        ("a.flac", "FLAC", "PCM_16", 1.0),
        # a file cut short: the blocks past its real end come back short (cut to 95 %, so that
        # what libsndfile decodes is kept: under 90 % load_audio tries FFmpeg)
        ("cut.wav", "WAV", "PCM_16", 0.95),
        ("a.ogg", "OGG", "VORBIS", 1.0),
        ("a.wav", "WAV", "PCM_24", 1.0),
    ],
)
def test_a_long_file_decoded_on_several_cores_is_one_pass_bit_for_bit(
    tmp_path: Path, stereo: np.ndarray, monkeypatch: pytest.MonkeyPatch, long_path: list[int],
    name: str, fmt: str, subtype: str | None, keep: float,
) -> None:
    path = tmp_path / name
    _write(path, stereo, fmt, subtype)
    if keep < 1.0:
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    one_pass = _decode(path, monkeypatch, threads=1)
    assert long_path == []
    for threads in (2, 3):
        parallel = _decode(path, monkeypatch, threads=threads)
        assert long_path[-1] == threads, "the file was not decoded in parallel"
        np.testing.assert_array_equal(parallel, one_pass)
    # from bytes as from a path
    np.testing.assert_array_equal(_decode(path.read_bytes(), monkeypatch, threads=2), one_pass)
    assert len(long_path) == 3

    expected_s = 75 * keep
    assert abs(len(one_pass) / SAMPLE_RATE - expected_s) < (0.1 if keep == 1.0 else 1.0)
    # and it is the speech that went in (the mean of the channels, at 16 kHz)
    reference = resample(stereo.mean(axis=1)[: len(one_pass) * RATE // SAMPLE_RATE], RATE)
    n = min(len(reference), len(one_pass)) - SAMPLE_RATE
    correlation = np.corrcoef(reference[:n], one_pass[:n].astype(np.float32))[0, 1]
    assert correlation > (0.999 if fmt in ("FLAC", "WAV") else 0.95)


@pytest.mark.parametrize(
    ("name", "rate", "channels", "fmt", "subtype"),
    [
        ("48k.flac", 48_000, 2, "FLAC", "PCM_16"),
        ("8k-mulaw.wav", 8_000, 1, "WAV", "ULAW"),  # a telephone recording: resampled up
        ("48k.opus", 48_000, 1, "OGG", "OPUS"),  # a browser's recording
        ("22k.ogg", 22_050, 1, "OGG", "VORBIS"),
    ],
)
def test_other_rates_decoded_on_several_cores_are_one_pass_bit_for_bit(
    tmp_path: Path, stereo: np.ndarray, monkeypatch: pytest.MonkeyPatch, long_path: list[int],
    name: str, rate: int, channels: int, fmt: str, subtype: str | None,
) -> None:
    monkeypatch.setattr(audio, "_WHOLE_FILE_SAMPLES", 1 << 18)
    data = resample(stereo[:, :channels].T.copy(), RATE, rate).T if channels > 1 else resample(stereo[:, 0], RATE, rate)[:, None]
    path = tmp_path / name
    _write_at(path, np.ascontiguousarray(data, dtype=np.float32), rate, fmt, subtype)
    one_pass = _decode(path, monkeypatch, threads=1)
    parallel = _decode(path, monkeypatch, threads=3)
    assert long_path == [3]
    assert abs(len(one_pass) / SAMPLE_RATE - 75) < 0.1
    np.testing.assert_array_equal(parallel, one_pass)


def _write_at(path: Path, data: np.ndarray, rate: int, fmt: str, subtype: str | None) -> None:
    with sf.SoundFile(path, "w", rate, data.shape[1], format=fmt, subtype=subtype) as out:
        for start in range(0, len(data), rate):
            out.write(data[start : start + rate])


def _lame(path: Path, data: np.ndarray, rate: int, bitrate: int) -> None:
    encode(data, rate, container="mp3", codec="libmp3lame", bit_rate=bitrate, path=path)


def _whole_read(path: Path) -> np.ndarray:
    """One read of the whole file: no boundary between reads inside it, so libsndfile is right."""
    with sf.SoundFile(path) as snd:
        whole = snd.read(dtype="float32", always_2d=True).mean(axis=1, dtype=np.float32)
        return audio._resample_swr(whole, snd.samplerate, SAMPLE_RATE)


def _assert_close(decoded: np.ndarray, expected: np.ndarray) -> None:
    assert abs(len(decoded) - len(expected)) <= 1
    n = min(len(decoded), len(expected))
    # mpg123 after a seek and FFmpeg's decoder round differently (1e-7): within a float16 step or two
    error = np.abs(decoded[:n] - expected[:n])
    assert error.max() < 2e-3, f"{error.max():.4f} at {np.argmax(error) / SAMPLE_RATE:.3f} s"


@pytest.mark.parametrize("threads", [1, 3], ids=["ffmpeg", "parallel"])
@pytest.mark.parametrize(
    ("rate", "channels", "bitrate"),
    [(44_100, 1, 32_000), (44_100, 2, 32_000), (8_000, 1, 8_000), (22_050, 1, 24_000), (44_100, 2, 128_000)],
)
def test_an_mp3_of_any_bitrate_is_decoded_whole(tmp_path: Path, stereo: np.ndarray, monkeypatch: pytest.MonkeyPatch,
                                                long_path: list[int], rate: int, channels: int, bitrate: int,
                                                threads: int) -> None:
    """libsndfile 1.2.2 corrupts a low-bitrate MP3 at every boundary between two reads (up to 70 ms
    of wrong samples after each; a decoder reading a minute at a time left one such stretch a
    minute). One read of the whole file is right. A long MP3 is decoded in parallel blocks of one
    read each, each primed by a margin before it; otherwise FFmpeg decodes it."""
    data = stereo[:, :channels] if rate == RATE else np.stack(
        [resample(stereo[:, c].copy(), RATE, rate) for c in range(channels)], axis=1)
    path = tmp_path / f"{rate}-{channels}-{bitrate}.mp3"
    _lame(path, data, rate, bitrate)
    monkeypatch.setattr(audio, "_WHOLE_FILE_SAMPLES", 1 << 18)
    decoded = _decode(path, monkeypatch, threads).astype(np.float32)
    assert long_path == ([] if threads == 1 else [threads])
    _assert_close(decoded, _whole_read(path))


def test_an_mp3_longer_than_its_header_says_is_decoded_to_its_end(
    tmp_path: Path, stereo: np.ndarray, monkeypatch: pytest.MonkeyPatch, long_path: list[int]
) -> None:
    """Two MP3s end to end (a recorder's split files joined with cat): the first one's header
    gives libsndfile the length, and it decodes no further. FFmpeg's demuxer sees the rest, so
    such a file is decoded by FFmpeg, not in parallel blocks."""
    first, second = tmp_path / "a.mp3", tmp_path / "b.mp3"
    _lame(first, stereo[:, :1], RATE, 64_000)
    _lame(second, stereo[: 30 * RATE, :1], RATE, 64_000)
    joined = tmp_path / "joined.mp3"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    with sf.SoundFile(joined) as snd:
        assert abs(snd.frames / RATE - 75) < 0.1  # the header speaks for the first file only
    monkeypatch.setattr(audio, "_WHOLE_FILE_SAMPLES", 1 << 18)
    decoded = _decode(joined, monkeypatch, threads=3)
    assert long_path == []
    assert abs(len(decoded) / SAMPLE_RATE - 105) < 0.2
    # and one MP3 alone, whose header is right, is decoded in parallel
    _decode(first, monkeypatch, threads=3)
    assert long_path == [3]


def test_a_short_file_stays_in_one_pass(tmp_path: Path, stereo: np.ndarray, monkeypatch: pytest.MonkeyPatch,
                                        long_path: list[int]) -> None:
    path = tmp_path / "short.flac"
    _write(path, stereo[: 20 * RATE], "FLAC", "PCM_16")  # one 15 s block and a bit: not worth threads
    _decode(path, monkeypatch, threads=4)
    assert long_path == []


def _m4a(data: np.ndarray) -> bytes:
    return encode(data, RATE, container="mp4", codec="aac")


def test_ffmpeg_decodes_to_the_mean_of_the_channels_resampled_as_one_stream(stereo: np.ndarray) -> None:
    """An M4A (FFmpeg's path): its frames are gathered into blocks, yet the samples are those of
    the whole decoded stream, down-mixed to the channels' mean and resampled in one go."""
    data = _m4a(stereo[: 40 * RATE])
    with av.open(io.BytesIO(data)) as container:
        planar = np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=1)
    mean = audio._downmix(planar.T)
    expected = np.clip(audio._resample_swr(mean, RATE, SAMPLE_RATE), -1, 1).astype(audio.STORAGE_DTYPE)

    decoded = load_audio(data).samples
    assert abs(len(decoded) / SAMPLE_RATE - 40) < 0.1
    np.testing.assert_array_equal(decoded, expected)


def test_a_loud_stereo_file_through_ffmpeg_keeps_its_level() -> None:
    """libswresample's own down-mix adds the channels at -3 dB each: a stereo M4A came out 3 dB
    louder than the same samples in a WAV, and clipped where both channels were loud."""
    t = np.arange(10 * RATE) / RATE
    tone = (0.9 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    stereo = np.stack([tone, tone], axis=1)
    through_ffmpeg = load_audio(_m4a(stereo)).float32()
    wav = io.BytesIO()
    sf.write(wav, stereo, RATE, format="WAV", subtype="FLOAT")
    through_libsndfile = load_audio(wav.getvalue()).float32()
    middle = slice(SAMPLE_RATE, 9 * SAMPLE_RATE)
    peak, reference = np.abs(through_ffmpeg[middle]).max(), np.abs(through_libsndfile[middle]).max()
    # AAC overshoots a little (0.93 for 0.9); the channels' sum at -3 dB each was 1.27, clipped to 1.0
    assert abs(peak - reference) < 0.05, (peak, reference)
    assert peak < 0.97


def test_damage_in_an_ogg_vorbis_stays_within_its_block(tmp_path: Path, stereo: np.ndarray,
                                                        monkeypatch: pytest.MonkeyPatch, long_path: list[int]) -> None:
    """libvorbis skips damaged pages and goes on, so in one pass everything after the damage comes
    early by the length it lost (5000 zeroed bytes a third of the way in: the whole rest of the
    file out of place). Each block starts where the file's own positions put it, so the damage
    stays inside its block and the blocks after it are where they belong."""
    path = tmp_path / "clean.ogg"
    _write(path, stereo, "OGG", "VORBIS")
    clean = _decode(path, monkeypatch, threads=1).astype(np.float32)
    damaged = bytearray(path.read_bytes())
    at = len(damaged) // 3
    damaged[at : at + 5000] = bytes(5000)
    path.write_bytes(bytes(damaged))

    def wrong_after(samples: np.ndarray, start_s: float) -> float:
        n = min(len(samples), len(clean))
        return float(np.abs(samples[: n].astype(np.float32) - clean[:n])[int(start_s * SAMPLE_RATE):].max())

    one_pass = _decode(path, monkeypatch, threads=1)
    parallel = _decode(path, monkeypatch, threads=3)
    assert long_path == [3]
    assert wrong_after(one_pass, 45.0) > 0.01  # out of place to the end
    assert wrong_after(parallel, 45.0) == 0.0  # the last blocks are as in the clean file
    assert abs(len(parallel) - len(clean)) <= 1


def test_a_wavpack_ffmpeg_wrote_to_a_pipe_is_decoded_whole(tmp_path: Path) -> None:
    """FFmpeg's WavPack muxer writes the file's sample count into its first block only where it
    can seek back to it; written to a pipe (``ffmpeg -i talk.wav -f wv - | curl -F file=@- ...``)
    the count stays 0, which FFmpeg reads as a length of 0. Held to its first block's count
    (282c4a1), 90 s of such a WavPack was refused, 415 "decodes to more than its header declares
    (0 s)", after the API's header check had counted it 0 s. Its length is unknown, as WavPack's
    own -1 is."""
    from shared.audio_limits import probe

    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def write(self, b) -> int:  # noqa: ANN001
            self.data += bytes(b)
            return len(b)

    rate, seconds = 16000, 90
    pipe = Pipe()
    with av.open(pipe, mode="w", format="wv") as out:
        stream = out.add_stream("wavpack", rate=rate, layout="mono")
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(seconds * rate) / rate)).astype(np.float32)
        for at in range(0, len(tone), rate):
            frame = av.AudioFrame.from_ndarray(tone[None, at : at + rate], format="flt", layout="mono")
            frame.rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    path = tmp_path / "piped.wv"
    path.write_bytes(bytes(pipe.data))
    assert path.read_bytes()[12:16] == b"\x00\x00\x00\x00"  # the first block's count, as a pipe leaves it

    assert probe(path).duration is None
    decoded = load_audio(path, max_duration=3600)
    assert len(decoded.samples) == seconds * SAMPLE_RATE
