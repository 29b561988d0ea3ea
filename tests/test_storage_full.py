"""A full upload storage (ENOSPC) is a clear 507 in the documented shape, with Retry-After, and
leaves nothing behind; it was a 500 "internal server error".

The full disk is real: a 512 KiB tmpfs mounted for the test, which needs root (skipped
otherwise); nothing of the API is mocked."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile as sf


@pytest.fixture()
def tiny_disk(tmp_path) -> Iterator[Path]:
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_an_upload_to_a_full_disk_is_a_507_that_leaves_nothing(settings, tiny_disk) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app

    # the session's Redis, a queue no worker reads: nothing is queued anyway
    changed = settings.model_copy(update={"storage_dir": tiny_disk / "uploads", "queue_name": "audio-storage-full"})
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    sf.write(buf, (rng.standard_normal(16000 * 40) * 0.1).astype("float32"), 16000, format="WAV", subtype="PCM_16")
    with TestClient(create_app(changed), raise_server_exceptions=False) as client:
        r = client.post("/jobs/embedding", files={"file": ("a.wav", buf.getvalue(), "audio/wav")})
    assert r.status_code == 507, r.text
    assert set(r.json()) == {"detail", "error_type", "timestamp"} and "storage is full" in r.json()["detail"]
    assert r.headers["retry-after"] == "60"
    assert list((tiny_disk / "uploads").iterdir()) == []


def test_a_worker_whose_disk_fills_while_fetching_fails_the_job_clearly(settings, tiny_disk, media_server) -> None:
    """A file_url larger than the worker's free disk: the job failed with "internal error". It
    now fails saying the worker's storage is full (507), and the partial download is gone."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from cli.launcher import Stack, wait_until
    from shared.jobs import JobStore
    from tests.conftest import wait_for_job

    queue, uploads = "audio-worker-disk-full", tiny_disk / "uploads"
    (tiny_disk.parent / "logs").mkdir()
    stack = Stack(log_dir=tiny_disk.parent / "logs")
    proc = stack.start_worker(queues=[queue], name="disk-full", env={
        "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "false", "AUDIO_ANALYSIS_QUEUE_NAME": queue,
        "AUDIO_ANALYSIS_STORAGE_DIR": str(uploads)})
    store = JobStore.from_settings(settings)
    try:
        wait_until(lambda: any(str(w.get("worker", "")).startswith("disk-full@") for w in store.workers()), 90,
                   "disk-full worker", proc)
        buf = io.BytesIO()
        rng = np.random.default_rng(1)
        sf.write(buf, (rng.standard_normal(16000 * 60) * 0.1).astype("float32"), 16000, format="WAV", subtype="PCM_16")
        media_server.file("/big.wav", buf.getvalue(), "audio/wav")  # 1.9 MB, the disk holds 512 KiB
        changed = settings.model_copy(update={"queue_name": queue, "storage_dir": uploads})
        with TestClient(create_app(changed), raise_server_exceptions=False) as client:
            job = client.post("/jobs/embedding", data={"file_url": media_server.url("/big.wav")}).json()
            done = wait_for_job(client, job["job_id"], timeout_s=60)
        assert done["status"] == "failed", done
        assert done["error"]["status_code"] == 507 and "storage is full" in done["error"]["detail"], done["error"]
        assert not any(p.is_file() for p in uploads.rglob("*")), list(uploads.rglob("*"))
    finally:
        stack.stop()
