"""A sixth round of hostile audio: what a file costs to decode, and what a verification makes of a
recording without a voice.

- Channels: every channel is decoded before the down-mix, so a decoder's work is channels x rate
  per second of audio, which neither the duration limit nor the job's time limit (a second per
  second of audio) sees. 255-channel Ogg Opus decoded at about a second of CPU per second of
  audio; files of more than MAX_CHANNELS are refused from the header.
- Verification: a stationary sound (hum, a tone, a DC offset, steady room noise) has the same
  CAM++ embedding whatever it is, so /compare said same_speaker=true, with a score near 1, for
  two recordings without a voice in them. Both files must now hold speech.

Engine-level cases call the engine and the decoder directly; the end-to-end ones go through the
API and the session's real Celery worker (tests/conftest.py).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import engine.audio as audio
from engine.audio import SAMPLE_RATE, load_audio
from shared.audio_limits import MAX_CHANNELS, check_audio_limits
from shared.errors import AudioDecodeError, InputError

from tests.conftest import failed_job_error

ERROR_KEYS = {"detail", "error_type", "timestamp"}
UTTERANCES = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech" / "utterances"


def _ogg(channels: int, seconds: float, subtype: str = "OPUS", rate: int = 48_000) -> bytes:
    """Noise on the first channel, silence on the others: the smallest file that makes a decoder
    work on every channel."""
    frames = int(seconds * rate)
    data = np.zeros((frames, channels), dtype=np.float32)
    data[:, 0] = np.random.default_rng(channels).standard_normal(frames).astype(np.float32) * 0.05
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="OGG", subtype=subtype)
    return buf.getvalue()


def _wav(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples, dtype=np.float32), rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _voiceless() -> dict[str, bytes]:
    """Ten seconds each of sounds without a voice, at ordinary levels."""
    t = np.arange(10 * SAMPLE_RATE) / SAMPLE_RATE
    rng = np.random.default_rng(6)
    return {
        "hum": _wav(0.01 * np.sin(2 * np.pi * 50 * t)),
        "tone": _wav(0.3 * np.sin(2 * np.pi * 1000 * t)),
        "dc": _wav(np.full(t.size, 0.2)),
        "room": _wav(rng.standard_normal(t.size) * 1e-3),
    }


# --- channels: what decoding costs --------------------------------------------------------------


def test_a_stream_of_more_channels_than_any_recording_is_refused_from_its_header() -> None:
    """10 s of 255-channel Ogg Opus (589 KB) took 9.7 s of CPU to decode, 16 s on a 2-core
    worker: an hour of it (about 200 MB) ran out its job's time limit in the decoder."""
    for data in (_ogg(255, 0.5), _ogg(MAX_CHANNELS + 1, 0.5, "VORBIS")):
        with pytest.raises(AudioDecodeError, match="channels"):  # the API's and the worker's header check
            check_audio_limits(io.BytesIO(data), max_duration=3600)
        started = time.perf_counter()
        with pytest.raises(AudioDecodeError, match="channels") as refused:
            load_audio(data)
        assert refused.value.status_code == 415
        assert time.perf_counter() - started < 0.5  # before a packet is decoded (it took 1.2 s)
        # FFmpeg's path (what an Ogg libsndfile could not read would take) refuses it too
        with pytest.raises(AudioDecodeError, match="channels"):
            audio._read_pyav(io.BytesIO(data), 3600.0)


def test_a_multitrack_recording_of_max_channels_is_still_decoded() -> None:
    data = _ogg(MAX_CHANNELS, 1.0)
    info = check_audio_limits(io.BytesIO(data), max_duration=3600)
    assert info is not None and info.channels == MAX_CHANNELS
    decoded = load_audio(data)
    assert decoded.duration == pytest.approx(1.0, abs=0.01)


def test_a_wide_file_is_decoded_in_one_pass_not_in_blocks_shorter_than_its_seeks() -> None:
    """64-channel Opus decoded in parallel blocks of a third of a second took 1.8 times the CPU
    of one pass (2.4 s against 1.3 s for 10 s): each block is a seek and two margins."""
    for channels, seconds, parallel in ((64, 1.0, False), (32, 1.5, False), (8, 6.0, True)):
        data = _ogg(channels, seconds, "VORBIS")
        with sf.SoundFile(io.BytesIO(data)) as snd:
            plan = audio._parallel_plan(snd, lambda: io.BytesIO(data), threads=2)
        assert (plan is not None) == parallel, (channels, plan)


# --- chained Ogg: every link is decoded --------------------------------------------------------


def _links(signal: np.ndarray, pieces: int, subtype: str, rate: int = SAMPLE_RATE) -> bytes:
    """``signal`` cut into ``pieces`` Ogg files joined end to end (``cat a.ogg b.ogg``): one
    chained Ogg."""
    out = b""
    for piece in np.array_split(signal, pieces):
        buf = io.BytesIO()
        sf.write(buf, piece, rate, format="OGG", subtype=subtype)
        out += buf.getvalue()
    return out


@pytest.mark.parametrize("subtype", ["OPUS", "VORBIS"])
def test_a_chained_ogg_is_decoded_to_the_end_of_its_last_link(subtype: str) -> None:
    """libsndfile stopped at the end of the first link and called that the end of the file: 30
    links of a 15 s recording decoded to 0.5 s, and were refused as too short."""
    t = np.arange(15 * SAMPLE_RATE) / SAMPLE_RATE
    signal = (0.3 * np.sin(2 * np.pi * 440 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    for pieces in (2, 30):
        decoded = load_audio(_links(signal, pieces, subtype))
        # Vorbis links each add their encoder's few ms of priming
        assert decoded.duration == pytest.approx(15.0, abs=0.05 * pieces), (pieces, decoded.duration)
        # the last link's audio is there: the tone's level, not silence
        tail = decoded.float32()[-2 * SAMPLE_RATE :]
        assert np.sqrt(np.mean(tail**2)) > 0.1


def test_a_chains_length_is_unknown_not_its_last_links() -> None:
    """libsndfile's length of a chain is its first link's (or none): 7 s and 3 s joined passed the
    API and set the worker's time limit as 7 s, and now decode to 10 s. Unknown now, as a piped
    FLAC's is: the decoder holds it to the job's limit; one link keeps its length."""
    rng = np.random.default_rng(2)
    links = [(rng.standard_normal(seconds * SAMPLE_RATE) * 0.1).astype(np.float32) for seconds in (7, 3)]
    chain = b"".join(_links(x, 1, "VORBIS") for x in links)
    with sf.SoundFile(io.BytesIO(chain)) as snd:
        assert snd.frames == 7 * SAMPLE_RATE  # the premise: libsndfile says 7 s
    assert check_audio_limits(io.BytesIO(chain), max_duration=5).duration is None
    assert load_audio(chain).duration == pytest.approx(10.0, abs=0.05)
    single = check_audio_limits(io.BytesIO(_links(links[0], 1, "VORBIS")), max_duration=3600)
    assert single.duration == pytest.approx(7.0)


def test_a_chain_whose_links_change_layout_keeps_its_first_link() -> None:
    """FFmpeg's decoder cannot follow a link of other channels; libsndfile's first link is
    decoded as before, and a later link of 255 channels is never decoded at all."""
    first = np.random.default_rng(1).standard_normal(2 * 48_000).astype(np.float32) * 0.1
    buf = io.BytesIO()
    sf.write(buf, first, 48_000, format="OGG", subtype="OPUS")
    chain = buf.getvalue() + _ogg(255, 0.5)
    started = time.perf_counter()
    decoded = load_audio(chain)
    assert decoded.duration == pytest.approx(2.0, abs=0.02)
    assert time.perf_counter() - started < 0.5


# --- verification needs a voice -----------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    from engine.core import Engine

    return Engine()


def test_verification_of_recordings_without_a_voice_is_refused(engine) -> None:
    """Hum, a tone, a DC offset and room noise scored 0.87 to 1.000 against each other, every
    pair 'the same speaker'; now each is a 422 naming the file."""
    voiceless = _voiceless()
    speech = (UTTERANCES / "spk1_snt1.wav").read_bytes()
    with pytest.raises(InputError, match="^file1: no speech") as refused:
        engine.compare(voiceless["hum"], voiceless["tone"])
    assert refused.value.status_code == 422
    with pytest.raises(InputError, match="^file2: no speech"):
        engine.compare(speech, voiceless["dc"])
    with pytest.raises(InputError, match="^audio: no speech"):
        engine.compare_embedding(voiceless["room"], np.asarray(engine.embed(speech).embedding))
    # real speech is still verified
    same = engine.compare(speech, (UTTERANCES / "spk1_snt2.wav").read_bytes())
    assert same.same_speaker and np.isfinite(same.similarity_score)


def test_speech_late_in_a_long_recording_is_still_found(engine) -> None:
    """A recording that speaks only after 25 s of room noise is found speaking, not refused."""
    rng = np.random.default_rng(7)
    speech, rate = sf.read(UTTERANCES / "spk1_snt3.wav", dtype="float32")
    assert rate == SAMPLE_RATE
    late = np.concatenate([rng.standard_normal(25 * SAMPLE_RATE).astype(np.float32) * 1e-3, speech])
    engine.require_speech(load_audio(_wav(late)), "file1")  # no error
    with pytest.raises(InputError):
        engine.require_speech(load_audio(_wav(late[: 25 * SAMPLE_RATE])), "file1")


# --- end to end: the API and the real worker -----------------------------------------------------


def test_the_api_refuses_a_file_of_too_many_channels_at_submit(client) -> None:
    r = client.post("/jobs/embedding", files={"file": ("wide.opus", _ogg(255, 0.5), "audio/ogg")})
    assert r.status_code == 415, r.text
    assert set(r.json()) == ERROR_KEYS and "channels" in r.json()["detail"]


def test_a_compare_job_of_two_voiceless_files_fails_with_a_422(client) -> None:
    voiceless = _voiceless()
    error = failed_job_error(client, "/jobs/compare", {"file1": ("hum.wav", voiceless["hum"], "audio/wav"),
                                                       "file2": ("tone.wav", voiceless["tone"], "audio/wav")}, 90)
    assert error["status_code"] == 422 and "no speech" in error["detail"], error
