"""FFmpeg's header read runs in a sandboxed child (shared/probe_sandbox.py).

The per-format pre-checks (MP4 tables, Matroska tags, leading ID3v2, APE frames, RIFF chunks)
each close one measured case; these files are of the same class, none of them checked, built the
way a hostile client would. Measured in-process (FFmpeg 18.1.0's PyAV, one core of this box,
``shared.audio_limits.ffmpeg_header``, i.e. the API's header check before the sandbox):

- WAV of MP3 (format 0x55, which libsndfile refuses) with an ``id3 `` chunk of 40,000 TXXX
  frames of their own names (755 KB): 16.6 s of CPU (10,000 frames, 185 KB: 0.85 s), quadratic:
  FFmpeg's WAV demuxer reads the chunk into a dictionary searched from its start for each frame.
  ``check_id3`` looks only at the file's start.
- FLV of AAC whose onMetaData is an ECMA array of 100,000 numbers (1.7 MB): 15.9 s of CPU
  (10,000: 0.15 s), quadratic the same way.
- TTA with an APEv2 tag of 65,536 fields (FFmpeg's maximum; 1.0 MB): 8.1 s of CPU (10,000: 0.15 s).

Each was queued (202) after holding the API's thread that long. Now each is refused 415 after the
header check's CPU limit (3 s by default) in a child, at submit and in the worker alike; normal
FFmpeg-only uploads (m4a, webm, mp3, mkv) pass, at about 10 ms more each.

With ``AUDIO_ANALYSIS_PROBE_SANDBOX=false`` the refusal tests fail (the file is read in-process
and queued).
"""

from __future__ import annotations

import io
import os
import signal
import struct
import time

import numpy as np
import pytest

from shared.errors import AudioDecodeError
from tests.conftest import newest_job_ids


def _encode(fmt: str, codec: str, seconds: float = 2.0, rate: int = 16000) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        name = stream.codec_context.format.name
        tone = (np.sin(2 * np.pi * 220 * np.arange(int(rate * seconds)) / rate) * 0.3).astype(np.float32)
        for at in range(0, len(tone), 1024):
            block = tone[None, at : at + 1024]
            if name.startswith("u8"):
                block = (block * 127 + 128).astype(np.uint8)
            elif name.startswith("s16"):
                block = (block * 32767).astype(np.int16)
            elif name.startswith("s32"):
                block = (block * 2**31).astype(np.int32)
            frame = av.AudioFrame.from_ndarray(block, format=name, layout="mono")
            frame.sample_rate, frame.pts = rate, at
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def wav_id3(frames: int = 40_000) -> bytes:
    """A WAV of MP3 with an ``id3 `` chunk of ``frames`` TXXX frames of their own names."""
    def safe(n: int) -> bytes:
        return bytes([(n >> 21) & 0x7F, (n >> 14) & 0x7F, (n >> 7) & 0x7F, n & 0x7F])

    mp3 = _encode("mp3", "libmp3lame")
    fmt = struct.pack("<HHIIHHH", 0x55, 1, 16000, 4000, 1, 0, 0)
    body = b"".join(b"TXXX" + struct.pack(">I", len(p)) + b"\0\0" + p for p in (b"\x03K%d\x00v" % i for i in range(frames)))
    tag = b"ID3\x03\x00\x00" + safe(len(body)) + body
    tag += b"\0" * (len(tag) % 2)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"id3 " + struct.pack("<I", len(tag)) + tag
    chunks += b"data" + struct.pack("<I", len(mp3)) + mp3 + b"\0" * (len(mp3) % 2)
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def flv_metadata(keys: int = 100_000) -> bytes:
    """An FLV of AAC whose onMetaData script tag is an ECMA array of ``keys`` numbers."""
    base = _encode("flv", "aac")

    def amf(s: bytes) -> bytes:
        return struct.pack(">H", len(s)) + s

    body = b"\x02" + amf(b"onMetaData") + b"\x08" + struct.pack(">I", keys)
    body += b"".join(amf(b"k%d" % i) + b"\x00" + struct.pack(">d", i) for i in range(keys)) + b"\x00\x00\x09"
    tag = b"\x12" + len(body).to_bytes(3, "big") + b"\0" * 7 + body
    return base[:13] + tag + struct.pack(">I", len(tag)) + base[13:]


def tta_apev2(fields: int = 65_536) -> bytes:
    """A TTA file with an APEv2 tag (header and footer) of ``fields`` text fields."""
    items = b"".join(struct.pack("<II", 1, 0) + b"K%d\0v" % i for i in range(fields))

    def frame(flags: int) -> bytes:
        return b"APETAGEX" + struct.pack("<IIII", 2000, len(items) + 32, fields, flags) + b"\0" * 8

    return _encode("tta", "tta") + frame(0xA0000000) + items + frame(0x80000000)


HOSTILE = {"id3-chunk.wav": wav_id3, "metadata.flv": flv_metadata, "apev2.tta": tta_apev2}


@pytest.fixture(scope="module")
def hostile() -> dict[str, bytes]:
    return {name: build() for name, build in HOSTILE.items()}


# The refusal tests below hold the reader to 1 s of CPU, not the default 3: a limit of CPU time
# is wall time only on a core of its own. At 3 s the reader was killed at 4 s of CPU (its hard
# limit), and a submit took 3.3-6.2 s on this project's 2-core machine beside another test run,
# past the 6 s bound; at 1 s it takes 1.0-1.3 s there. FFmpeg needs 8-16 s for each file.
SHORT_CPU_S = 1


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_header_ffmpeg_cannot_read_within_the_limits_is_refused_at_submit(client, variant_app, hostile, name):
    api = variant_app(probe_cpu_s=SHORT_CPU_S)
    before = newest_job_ids(client)
    started = time.monotonic()
    r = api.post("/jobs/diarize", files={"file": (name, hostile[name], "application/octet-stream")})
    elapsed = time.monotonic() - started
    assert r.status_code == 415, r.text
    body = r.json()
    assert body["error_type"] == "ValidationError"
    assert "header could not be read within the limits" in body["detail"] and "CPU" in body["detail"]
    assert elapsed < 6.0  # the 1 s CPU limit, not 8-16 s of FFmpeg (nor the 10 s wall-clock timeout)
    assert newest_job_ids(client) == before  # no job


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_the_worker_refuses_it_too_before_decoding(tmp_path, settings, hostile, name):
    from shared.audio_limits import check_audio_limits

    path = tmp_path / name
    path.write_bytes(hostile[name])
    started = time.monotonic()
    with pytest.raises(AudioDecodeError, match="within the limits"):
        check_audio_limits(path, max_duration=3600,
                           sandbox=settings.model_copy(update={"probe_cpu_s": SHORT_CPU_S}).probe_limits())
    assert time.monotonic() - started < 6.0


def test_the_wall_clock_timeout_kills_the_child(tmp_path, hostile):
    from shared.probe_sandbox import ProbeLimits, SandboxUnavailable, read_header

    path = tmp_path / "slow.flv"
    path.write_bytes(hostile["metadata.flv"])  # 15.9 s of CPU to read
    # 2 s, not less: a child given under half of its time's CPU is taken for a starved host (503),
    # and on a loaded 2-core CI machine a 0.5 s child got 0.2 s of it. A run with three pytest
    # processes and a busy loop on two cores gave even the 2 s child 0.9 s: such a 503 says "retry
    # later", and the test does as a client would, up to five times (three were all starved once
    # with a bench running beside the suite)
    for _ in range(5):
        started = time.monotonic()
        try:
            read_header(path, ProbeLimits(cpu_s=60, timeout_s=2.0))
        except SandboxUnavailable:
            continue
        except AudioDecodeError as exc:
            assert "longer than 2 s" in str(exc), exc
            assert time.monotonic() - started < 4.0
            return
        raise AssertionError("the reader of a 15.9 s header was not stopped")
    raise AssertionError("the host starved the header check on five tries")


def _segfault(conn, kind, payload, limits) -> None:  # the child: a crash in FFmpeg, as it would look
    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_crash_of_the_child_is_a_415_not_a_500(client, monkeypatch):
    import shared.probe_sandbox as sandbox

    monkeypatch.setattr(sandbox, "_child", _segfault)
    r = client.post("/jobs/diarize", files={"file": ("a.m4a", _encode("mp4", "aac"), "audio/mp4")})
    assert r.status_code == 415, r.text
    assert "reader died" in r.json()["detail"] and r.json()["error_type"] == "ValidationError"
    assert client.get("/health").status_code == 200


def _written() -> dict[str, tuple[bytes, str]]:
    return {
        "phone.m4a": (_encode("mp4", "aac"), "audio/mp4"),
        "recorder.webm": (_encode("webm", "libopus", rate=48000), "audio/webm"),
        "song.mp3": (_encode("mp3", "libmp3lame"), "audio/mpeg"),
        "track.mkv": (_encode("matroska", "aac"), "audio/x-matroska"),
    }


def test_ffmpeg_only_uploads_still_pass_and_nothing_leaks(client, tmp_path):
    from shared.audio_limits import check_audio_limits
    from shared.probe_sandbox import ProbeLimits

    for name, (data, mime) in _written().items():
        r = client.post("/jobs/diarize", files={"file": (name, data, mime)})
        assert r.status_code == 202, (name, r.text)
        client.post(f"/jobs/{r.json()['job_id']}/cancel")
        path = tmp_path / name
        path.write_bytes(data)
        info = check_audio_limits(path, max_duration=3600, sandbox=ProbeLimits())
        assert info is not None and info.sample_rate in (16000, 48000) and 1.9 < info.duration < 2.2, (name, info)

    # 200 probes, from a path, a file on disk and one in memory: no child and no descriptor left
    import multiprocessing
    import tempfile

    from shared.probe_sandbox import read_header

    data = _written()["phone.m4a"][0]
    spooled = tempfile.SpooledTemporaryFile(max_size=1 << 20)
    spooled.write(data * 20)  # past max_size: a temporary file, handed over by descriptor
    spooled.seek(0)
    path = tmp_path / "phone.m4a"
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(200):
        source = (path, spooled, io.BytesIO(data))[i % 3]
        assert read_header(source, ProbeLimits()) is not None
    assert len(os.listdir("/proc/self/fd")) == fds
    assert spooled.tell() == 0  # the child read its own opening of the file
    assert not [p for p in multiprocessing.active_children() if p.name == "probe-sandbox"]


# --- what is not the file's doing is a 503, not a 415 and not a 500 -----------------------------
def test_a_removed_fork_server_socket_is_met_by_a_new_server(tmp_path):
    """A tmp cleaner (systemd-tmpfiles' age rule, tmpwatch) that removes the fork server's socket
    directory (/tmp/pymp-*/listener-*) under a long-running API left the server alive, so
    multiprocessing never started another: every later FFmpeg-format upload raised
    FileNotFoundError, a 500, until a restart. Now the server is started anew."""
    import shutil
    from multiprocessing import forkserver

    from shared.probe_sandbox import ProbeLimits, read_header, warm

    path = tmp_path / "phone.m4a"
    path.write_bytes(_written()["phone.m4a"][0])
    warm()
    assert read_header(path, ProbeLimits()) is not None
    old = forkserver._forkserver._forkserver_pid
    shutil.rmtree(os.path.dirname(forkserver._forkserver._forkserver_address))
    for _ in range(2):
        assert read_header(path, ProbeLimits()) is not None
    assert forkserver._forkserver._forkserver_pid != old
    with pytest.raises(ChildProcessError):
        os.waitpid(old, os.WNOHANG)  # the old server killed and reaped


def test_a_process_forked_after_its_fork_server_started_reads_headers(tmp_path):
    """A process forked after its fork server started (a prefork pool's child) had
    ensure_running() waitpid() the parent's server: ChildProcessError on every probe."""
    from shared.probe_sandbox import ProbeLimits, read_header, warm

    path = tmp_path / "phone.m4a"
    path.write_bytes(_written()["phone.m4a"][0])
    warm()
    pid = os.fork()
    if pid == 0:
        try:
            info = read_header(path, ProbeLimits())
            os._exit(0 if info is not None and info.sample_rate == 16000 else 1)
        except BaseException:  # noqa: BLE001
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert read_header(path, ProbeLimits()) is not None  # the parent's server untouched


def test_a_sandbox_that_cannot_start_is_a_503_with_retry_after(client, monkeypatch):
    import shared.probe_sandbox as sandbox

    starts = []

    def broken(self):
        starts.append(1)
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(sandbox._Process, "start", broken)
    r = client.post("/jobs/diarize", files={"file": ("a.m4a", _encode("mp4", "aac"), "audio/mp4")})
    assert r.status_code == 503, r.text
    assert r.json()["error_type"] == "ModelError" and "retry later" in r.json()["detail"]
    assert r.headers.get("Retry-After")
    assert len(starts) == 2  # tried again once, after a new server


def _sleeps(conn, kind, payload, limits) -> None:  # the child: given no CPU, as on a starved host
    time.sleep(30)


def _killed(conn, kind, payload, limits) -> None:  # the child: killed from outside (an OOM killer)
    os.kill(os.getpid(), signal.SIGKILL)


def _spins(conn, kind, payload, limits) -> None:  # the child: FFmpeg's loop, to its CPU limit
    resource = __import__("resource")
    resource.setrlimit(resource.RLIMIT_CPU, (1, 2))
    while True:
        pass


@pytest.mark.parametrize("child, status, words", [
    (_sleeps, 503, "overloaded"), (_killed, 503, "killed by the system"), (_spins, 415, "ran out of CPU time")])
def test_a_starved_or_killed_reader_is_the_service_state_not_the_file(tmp_path, monkeypatch, child, status, words):
    """A wall-clock timeout of a child that used little CPU is a starved host and a SIGKILL before
    the CPU limit is an OOM killer: 503 (retry later), not 415 ("ran out of CPU time", as both
    were reported). A child at its CPU limit is still a 415."""
    import shared.probe_sandbox as sandbox
    from shared.errors import ModelError

    monkeypatch.setattr(sandbox, "_child", child)
    path = tmp_path / "phone.m4a"
    path.write_bytes(_written()["phone.m4a"][0])
    expected = ModelError if status == 503 else AudioDecodeError
    with pytest.raises(expected, match=words) as caught:
        sandbox.read_header(path, sandbox.ProbeLimits(cpu_s=1, timeout_s=5.0 if child is _spins else 1.0))
    assert caught.value.status_code == status


def _read_in_a_daemon(queue, data: bytes) -> None:
    import io

    from shared.probe_sandbox import ProbeLimits, read_header

    try:
        queue.put(("ok", read_header(io.BytesIO(data), ProbeLimits())))
    except BaseException as exc:  # noqa: BLE001 - reported to the test, whatever it is
        queue.put(("raised", f"{type(exc).__name__}: {exc}"))


def test_a_celery_pool_process_reads_headers(tmp_path):
    """Celery's prefork pool runs jobs in daemonic billiard processes. multiprocessing forbids a
    daemonic process children ("daemonic processes are not allowed to have children"), and its
    pickler refuses billiard's authentication key: every FFmpeg-only upload failed there as an
    internal error, and every deployed worker (and `up`'s) is a prefork one. The worker's own test
    is tests/test_worker_device.py::test_a_job_whose_header_check_is_killed_by_the_system_runs_again."""
    import billiard

    ctx = billiard.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_read_in_a_daemon, args=(queue, _encode("mp4", "aac")), daemon=True)
    proc.start()
    try:
        outcome, value = queue.get(timeout=60)
    finally:
        proc.join(10)
    assert outcome == "ok", value
    assert value is not None and abs(value.duration - 2.0) < 0.05 and value.sample_rate == 16000
