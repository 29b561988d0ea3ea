"""More of what a hostile or careless client tried, against real processes (the session's Redis
and Celery worker, the API in-process), after tests/test_hostile_inputs.py.

Each test fails on the code before its fix:

* a voiceprint label with a line break (``Ann\\nLee``, U+2028), DEL or a right-to-left override
  (U+202E, which shows ``SPEAKER_00`` as ``00_REKAEPS`` in the subtitles next to it) was stored,
  or refused only after a worker had embedded every file of the enrollment: ``POST /voiceprints``
  checked the label once the job was done;
* one API key could store voiceprints without end (an import is a cheap request, each keeps about
  5 KB in a Redis that never evicts them): a loop of imports filled Redis, and then no job of any
  tenant could be stored;
* the header check let FFmpeg pick any demuxer: an uploaded SDP description made the API bind a
  UDP port and wait 10 s for RTP packets before it answered (a thread of its pool held per
  upload), and a concat list (``ffconcat version 1.0 / file sub/x.wav``) made it read a file
  relative to its working directory and refuse the upload with that file's duration.
"""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

ERROR_KEYS = {"detail", "error_type", "timestamp"}


def _assert_error(r, status: int, fragment: str = "") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == ERROR_KEYS, body
    assert fragment.lower() in body["detail"].lower(), body["detail"]
    return body


def _wav(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "audio/wav")


def _enroll_jobs(client) -> set[str]:
    return {j["job_id"] for j in client.get("/jobs", params={"kind": "enroll", "limit": 100}).json()["jobs"]}


# --- voiceprint labels: one line of printable text, checked before any work ---------------------


@pytest.mark.parametrize("label", ["Ann\nLee", "Ann\u2028Lee", "Ann\x7fLee", "Ann\x85Lee", "\u202eAnn Lee",
                                   "Ann\u2066Lee"])
def test_a_label_that_could_break_a_line_or_reorder_one_is_refused_before_any_job(client, utterances, label):
    before = _enroll_jobs(client)
    r = client.post("/voiceprints", files=[("files", _wav(utterances["spk1"][0]))], data={"label": label})
    _assert_error(r, 422, "label")
    assert _enroll_jobs(client) == before, "a worker enrolled the files of a request refused for its label"
    assert r.json()["detail"].startswith("label:"), r.json()["detail"]
    # the same rule for a job's own enrollment and for an import
    r = client.post("/jobs/enroll", files=[("files", _wav(utterances["spk1"][0]))], data={"label": label})
    _assert_error(r, 422, "label")
    r = client.post("/voiceprints/import", files={"file": ("v.json", b"[" + b"0.1," * 191 + b"0.1]", "application/json")},
                    data={"label": label, "model": "3d-speaker/campplus-cn-en-common"})
    _assert_error(r, 422, "label")
    assert _enroll_jobs(client) == before


def test_names_in_any_script_are_still_labels(client):
    # joiners are part of Persian names and emoji; direction marks are harmless
    for label in ("\u0645\u06cc\u200c\u0631\u0627", "Zo\u00eb \u200fO'Brien", "\U0001f469\u200d\U0001f52c Ada"):
        r = client.post("/voiceprints/import", files={"file": ("v.json", b"[" + b"0.1," * 191 + b"0.1]", "application/json")},
                        data={"label": label, "model": "3d-speaker/campplus-cn-en-common"})
        assert r.status_code == 201, r.text
        assert r.json()["label"] == label
        assert client.delete(f"/voiceprints/{r.json()['id']}").status_code == 204


# --- voiceprints: a bounded number per API key ---------------------------------------------------

VECTOR = ("v.json", b"[" + b"0.1," * 191 + b"0.1]", "application/json")
MODEL = {"model": "3d-speaker/campplus-cn-en-common"}


def test_one_key_cannot_store_voiceprints_without_end(variant_app, utterances):
    capped = variant_app(api_keys=[SecretStr("cap-a"), SecretStr("cap-b")], voiceprints_max_per_owner=3)
    a, b = {"X-API-Key": "cap-a"}, {"X-API-Key": "cap-b"}
    # concurrent imports: the count and the write are one transaction, so no more than 3 pass
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(
        capped.post("/voiceprints/import", files={"file": VECTOR}, data={"label": "Ann", **MODEL}, headers=a).status_code))
        for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [201] * 3 + [409] * 5, answers
    assert capped.get("/voiceprints", headers=a).json()["count"] == 3
    r = capped.post("/voiceprints/import", files={"file": VECTOR}, data={"label": "Ann", **MODEL}, headers=a)
    _assert_error(r, 409, "delete some")
    # an enrollment is refused before a worker embeds its files
    jobs = {j["job_id"] for j in capped.get("/jobs", params={"limit": 100}, headers=a).json()["jobs"]}
    r = capped.post("/voiceprints", files=[("files", _wav(utterances["spk1"][0]))], data={"label": "Ann"}, headers=a)
    _assert_error(r, 409, "delete some")
    assert {j["job_id"] for j in capped.get("/jobs", params={"limit": 100}, headers=a).json()["jobs"]} == jobs
    # another key has its own room; a deletion makes room again
    assert capped.post("/voiceprints/import", files={"file": VECTOR}, data={"label": "Bo", **MODEL},
                       headers=b).status_code == 201
    first = capped.get("/voiceprints", headers=a).json()["voiceprints"][0]["id"]
    assert capped.delete(f"/voiceprints/{first}", headers=a).status_code == 204
    assert capped.post("/voiceprints/import", files={"file": VECTOR}, data={"label": "Ann", **MODEL},
                       headers=a).status_code == 201
    for key in (a, b):
        for vp in capped.get("/voiceprints", headers=key).json()["voiceprints"]:
            capped.delete(f"/voiceprints/{vp['id']}", headers=key)


# --- the header check reads the upload's own bytes, nothing it names ------------------------------


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sdp(port: int) -> bytes:
    return (f"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n").encode()


def test_an_sdp_upload_opens_no_socket_and_is_answered_at_once(client):
    started = time.monotonic()
    r = client.post("/jobs/embedding", files={"file": ("stream.sdp", _sdp(_free_udp_port()), "application/sdp")})
    took = time.monotonic() - started
    if r.status_code == 202:  # not a recording: the worker's decoder says so; not waited for here
        client.post(f"/jobs/{r.json()['job_id']}/cancel")
    else:
        _assert_error(r, 415)
    assert took < 3, f"the API waited {took:.1f} s on an RTP session an upload described"


def test_a_list_naming_other_files_is_not_followed(short_sample, tmp_path, monkeypatch):
    from shared.audio_limits import NotAudioError, check_audio_limits, probe

    # a recording beside the process, as a checkout or an image holds files under its working directory
    (tmp_path / "sub").mkdir()
    shutil.copy(short_sample, tmp_path / "sub" / "real.wav")
    monkeypatch.chdir(tmp_path)
    lists = {
        "concat": b"ffconcat version 1.0\nfile sub/real.wav\n",
        "hls": b"#EXTM3U\n#EXT-X-TARGETDURATION:12\n#EXTINF:12,\nsub/real.wav\n#EXT-X-ENDLIST\n",
    }
    for name, text in lists.items():
        (tmp_path / f"{name}.bin").write_bytes(text)
        for source in (tmp_path / f"{name}.bin", (tmp_path / f"{name}.bin").open("rb")):
            assert probe(source) is None, (name, source)
            # nothing to tell about the file it names: not its length, not that it exists; the
            # list itself is not audio (415 at submit, in the words the worker's decoder used)
            with pytest.raises(NotAudioError) as refused:
                check_audio_limits(source, max_duration=1)
            assert refused.value.detail.startswith("not a decodable audio file ("), (name, refused.value)
            assert "real.wav" not in refused.value.detail


def test_common_containers_still_have_their_header_read(short_sample):
    import av
    import numpy as np

    from shared.audio_limits import probe

    x = (np.sin(np.arange(16000 * 2) / 10) * 0.3).astype("float32").reshape(1, -1)
    for container, codec in [("mp4", "aac"), ("matroska", "pcm_s16le"), ("adts", "aac"), ("mp3", "libmp3lame"),
                             ("ogg", "libopus"), ("flv", "aac"), ("mpegts", "mp2"), ("caf", "alac"), ("avi", "pcm_s16le")]:
        buf = io.BytesIO()
        with av.open(buf, "w", format=container) as out:
            stream = out.add_stream(codec, rate=48000 if codec == "libopus" else 16000)
            stream.layout = "mono"
            frame = av.AudioFrame.from_ndarray(x, format="flt", layout="mono")
            frame.sample_rate = 16000
            resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono",
                                          rate=stream.codec_context.sample_rate)
            for f in [*resampler.resample(frame), None]:
                for packet in stream.encode(f):
                    out.mux(packet)
        info = probe(io.BytesIO(buf.getvalue()))
        assert info is not None and info.sample_rate in (16000, 48000), (container, codec, info)
