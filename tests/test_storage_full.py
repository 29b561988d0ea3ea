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
