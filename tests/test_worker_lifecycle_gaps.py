"""Gaps in the worker's life cycle, shown with real Celery worker processes (the production
``celery -A ... worker`` command line) and the session's Redis, nothing of Celery, billiard or
Redis mocked. Each fix's test fails on the code before it (checked); the others pin what held
already, or what a fix must not break:

* a prefork worker whose pool processes keep dying as they load the models (the OOM killer, a
  GPU driver crash; ``tests/_dying_load_worker.py`` SIGKILLs each load 0.3 s in) stopped
  announcing its queues after two deaths, but its main process stayed up for good: Kubernetes and
  compose saw a running container and never restarted it, never backed off, never showed
  CrashLoopBackOff. It now exits with status 1 after ``worker_max_load_deaths`` (3) deaths in a
  row, saying why in a critical log line; a worker whose load *raises* (``load_error``) stays up
  and answers 503 as before;
* a prefork worker whose main process is frozen (SIGSTOP; or hung: its consumer's loop blocked)
  fetches no job, acknowledges none and answers no control message, while its pool processes,
  which write the heartbeat and announce the queues, run on: /health listed it as alive and the
  queue's consumers key stayed up for good, so synchronous calls were taken for a worker that
  would never run them (each waited the sync timeout, an hour, for a 504). The pool processes now
  heartbeat only while the main process's loop stamps its progress;
* an upload storage that refuses writes: one turned read-only while the API runs (a tmpfs
  remounted ro: a real EROFS) was already a 503 in the documented shape that stores nothing
  (pinned here); one whose folder cannot be made at the API's start made the API raise at import,
  serving nothing. It now starts and answers uploads the same 503.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.conftest import tone_wav
from tests.test_hostile_round13_lifecycle import NO_MODELS, _api_with, _wait

DEATH = "exited with 'signal 9 (SIGKILL)'"


def _spawn(base: Any, name: str, app: str, queue: str, env: dict[str, str], concurrency: int = 1) -> Any:
    """The production command line (``celery -A <app> worker``, as the images run it) for ``app``."""
    from cli.launcher import Stack

    stack = Stack(log_dir=base)
    proc = stack.spawn(name, [
        sys.executable, "-m", "celery", "-A", app, "worker", "--pool", "prefork", "--concurrency", str(concurrency),
        "-Q", queue,
        "-n", f"{name}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ], env=env)
    return stack, proc, base / f"{name}.log"


def test_a_worker_whose_pool_processes_keep_dying_as_they_load_exits_non_zero(service_env, settings, tmp_path_factory):
    """Each pool process is SIGKILLed 0.3 s into its load. The worker's main process exits with
    status 1 after the third death, with a critical line saying why, and leaves no heartbeat or
    queue announced behind it. Before, it never exited (checked: still up after 12 deaths)."""
    from shared.jobs import JobStore

    store = JobStore.from_settings(settings)
    queue = "audio-gaps-dying"
    stack, proc, log = _spawn(tmp_path_factory.mktemp("gaps-dying"), "gapsdying", "tests._dying_load_app", queue,
                              {"AUDIO_ANALYSIS_QUEUE_NAME": queue})
    try:
        started, gave_up = time.monotonic(), 0.0
        # a death every 1-5 s here; 120 s leaves a loaded CI host room, and the old code never exited
        while proc.poll() is None:
            text = log.read_text(errors="replace") if log.exists() else ""
            if not gave_up and "stopping the worker with exit status 1" in text:
                gave_up = time.monotonic()
            assert time.monotonic() - started < 120, \
                f"the worker is still up after {text.count(DEATH)} of its pool processes died loading"
            time.sleep(0.2)
        text = log.read_text(errors="replace")
        print(f"\nworker exited {proc.returncode} {time.monotonic() - started:.1f} s after its start, after "
              f"{text.count(DEATH)} load deaths, {time.monotonic() - (gave_up or started):.1f} s after it gave up")
        assert proc.returncode == 1, text[-3000:]
        assert text.count(DEATH) == 3, text[-3000:]
        assert "died 3 times in a row while loading the models" in text and "CRITICAL" in text, text[-3000:]
        # gone from /health and from the queue's consumers: synchronous calls get their 503
        assert not [w for w in store.workers() if w["worker"].startswith("gapsdying@")]
        _wait(lambda: not store.redis.exists(store.consumers_key(queue)), 20, "the queue is still announced")
    finally:
        stack.stop()


def test_a_worker_whose_load_raises_stays_up_with_its_load_error(service_env, settings, tmp_path_factory):
    """The load raises (no weights, no GPU): the pool process lives on with its load_error, which
    /health shows and synchronous calls are answered 503 for at once; the worker must not exit
    (nothing died, and a restart would fail the same way)."""
    from shared.jobs import JobStore

    store = JobStore.from_settings(settings)
    queue = "audio-gaps-raising"
    stack, proc, log = _spawn(tmp_path_factory.mktemp("gaps-raising"), "gapsraising", "tests._raising_load_app",
                              queue, {"AUDIO_ANALYSIS_QUEUE_NAME": queue})
    try:
        def beat() -> list[dict[str, Any]]:
            return [w for w in store.workers() if w["worker"].startswith("gapsraising@") and w.get("load_error")]

        _wait(lambda: bool(beat()) or proc.poll() is not None, 60, "no heartbeat with a load_error", step=0.2)
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert "no weights here" in beat()[0]["load_error"]
        time.sleep(3)  # several heartbeats (1 s)
        assert proc.poll() is None and beat(), log.read_text(errors="replace")[-3000:]
    finally:
        stack.stop()


def test_a_worker_whose_main_process_is_frozen_stops_looking_alive(service_env, settings, tmp_path_factory):
    """SIGSTOP to a prefork worker's main process (no models; 1 s heartbeats, which live 3 s).
    Within a bound (a few seconds here; 45 s leaves a loaded host room) it leaves /health's
    workers and its queue's consumers key lapses, so a synchronous call is answered 503 at once;
    after SIGCONT it heartbeats again. Before, its pool process went on heartbeating for good
    (checked: still listed 45 s after the SIGSTOP)."""
    from shared.jobs import JobStore

    store = JobStore.from_settings(settings)
    queue = "audio-gaps-frozen"
    base = tmp_path_factory.mktemp("gaps-frozen")
    # and its liveness file, which Kubernetes' probe reads (python -m worker.alive)
    probe_env = {"AUDIO_ANALYSIS_WORKER_LIVENESS_FILE": str(base / "alive"),
                 "AUDIO_ANALYSIS_WORKER_LIVENESS_MAX_AGE_S": "5"}
    env = {"AUDIO_ANALYSIS_QUEUE_NAME": queue, **NO_MODELS, **probe_env}
    stack, proc, log = _spawn(base, "gapsfrozen", "worker.celery_app", queue, env)

    def probe() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "worker.alive"], env={**os.environ, **probe_env},
                              capture_output=True, text=True, timeout=60)

    def listed() -> bool:
        return any(w["worker"].startswith("gapsfrozen@") for w in store.workers())

    def alive() -> bool:
        return listed() or bool(store.redis.exists(store.consumers_key(queue)))

    stopped = False
    try:
        _wait(lambda: listed() or proc.poll() is not None, 60, "the worker never heartbeat", step=0.2)
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert probe().returncode == 0, probe().stderr
        proc.send_signal(signal.SIGSTOP)
        stopped, frozen_at = True, time.monotonic()
        while alive() and time.monotonic() - frozen_at < 45:
            time.sleep(0.2)
        gone_after = time.monotonic() - frozen_at
        print(f"\nfrozen worker {'gone' if not alive() else 'still listed'} {gone_after:.1f} s after its SIGSTOP")
        assert not alive(), f"a worker whose main process is stopped still looks alive {gone_after:.0f} s on"
        with _api_with(settings.model_copy(update={"queue_name": queue})) as client:
            started = time.monotonic()
            r = client.post("/diarize", files={"file": ("a.wav", tone_wav(2.0), "audio/wav")})
            assert r.status_code == 503 and time.monotonic() - started < 10, (r.status_code, r.text)
        # its liveness file went stale with it (5 s here; 60 s by default): the probe fails, and
        # Kubernetes restarts the container
        failed = probe()
        assert failed.returncode == 1 and "frozen or hung" in failed.stderr, (failed.returncode, failed.stderr)
        proc.send_signal(signal.SIGCONT)
        stopped = False
        _wait(listed, 30, "the worker did not heartbeat again after SIGCONT", step=0.2)
        _wait(lambda: probe().returncode == 0, 30, "the liveness probe still fails after SIGCONT", step=0.5)
    finally:
        if stopped:
            proc.send_signal(signal.SIGCONT)
        stack.stop()


def test_a_worker_whose_broker_connection_is_cut_keeps_heartbeating(service_env, settings, tmp_path_factory):
    """The other side of the frozen-main-process check: a main process that lost its broker
    connection (a Redis blip) and reconnected is making progress, and its pool process must keep
    heartbeating. Celery cancels the timer entries a consumer's step registered for a lost
    connection; the stamp's step registers its entry again with the new one (were it not, the
    worker would leave /health 15 s after every blip). The worker reaches Redis through a proxy
    that cuts its BRPOP connection once."""
    from urllib.parse import urlsplit

    from shared.jobs import JobStore
    from tests.test_worker_redis_blip import CuttingProxy

    store = JobStore.from_settings(settings)
    queue = "audio-gaps-blip"
    proxy = CuttingProxy(urlsplit(settings.redis_url).port or 6379)
    via_proxy = f"redis://127.0.0.1:{proxy.port}/{urlsplit(settings.redis_url).path.strip('/') or 0}"
    env = {"AUDIO_ANALYSIS_QUEUE_NAME": queue, "REDIS_URL": via_proxy, "AUDIO_ANALYSIS_REDIS_URL": via_proxy,
           **NO_MODELS}
    stack, proc, log = _spawn(tmp_path_factory.mktemp("gaps-blip"), "gapsblip", "worker.celery_app", queue, env)

    def listed() -> bool:
        return any(w["worker"].startswith("gapsblip@") for w in store.workers())

    try:
        _wait(lambda: listed() or proc.poll() is not None, 60, "the worker never heartbeat", step=0.2)
        proxy.arm(b"BRPOP", 1)
        _wait(lambda: proxy.cuts.get(b"BRPOP", 0) >= 1, 20, "the broker connection was not cut", step=0.2)
        _wait(lambda: "Connection to broker lost" in log.read_text(errors="replace"), 20,
              "the worker did not notice the cut", step=0.2)
        # past the stall bound (15 s) and the heartbeat's lifetime (3 s): listed all along
        until = time.monotonic() + 25
        while time.monotonic() < until:
            assert listed(), f"the worker left /health after a reconnect: {log.read_text(errors='replace')[-2000:]}"
            time.sleep(0.5)
        assert proc.poll() is None
    finally:
        proxy.close()
        stack.stop()


# --- an upload storage that cannot be written -------------------------------------------------------

@contextlib.contextmanager
def _read_only_dir(base: Path) -> Iterator[Callable[[], None]]:
    """A folder, and a callable that makes it refuse writes for good: a tmpfs remounted read-only
    (EROFS, a volume mounted ro or a filesystem the kernel turned read-only after an error) where
    this process may mount, else chmod 0555 where it is not root (root writes through a chmod)."""
    import os
    import subprocess

    folder = base / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"root without the right to mount (chmod would not stop its writes): {done.stderr[:200]!r}")
        try:
            yield lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)
        finally:
            subprocess.run(["umount", str(folder)], check=False)
    else:
        try:
            yield lambda: folder.chmod(0o555)
        finally:
            folder.chmod(0o755)


@pytest.mark.parametrize("route", ["/jobs/embedding", "/jobs/batch"])
def test_an_upload_to_a_read_only_storage_is_a_503_that_leaves_nothing(settings, tmp_path, route):
    """The storage folder turns read-only after the API started (a volume remounted ro, a disk
    the kernel set read-only after an I/O error): a submission is the service's fault and passes,
    so it is a 503 in the documented error shape with Retry-After, never a 500, and leaves neither
    a file nor a job behind."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from shared.jobs import JobStore

    with _read_only_dir(tmp_path) as make_read_only:
        uploads = tmp_path / "ro" / "uploads"
        changed = settings.model_copy(update={"storage_dir": uploads, "queue_name": "audio-gaps-ro"})
        store = JobStore.from_settings(changed)
        before = {r.job_id for r in store.recent(50)}
        with TestClient(create_app(changed), raise_server_exceptions=False) as client:
            make_read_only()
            files = [("files", (f"{i}.wav", tone_wav(2.0), "audio/wav")) for i in range(2)] if "batch" in route \
                else {"file": ("a.wav", tone_wav(2.0), "audio/wav")}
            r = client.post(route, files=files, data={"kind": "embedding"} if "batch" in route else None)
        print(f"\n{route} to a read-only storage: {r.status_code} {r.text}")
        assert r.status_code == 503, r.text
        assert set(r.json()) == {"detail", "error_type", "timestamp"}, r.json()
        assert r.json()["error_type"] == "ModelError" and "storage unavailable" in r.json()["detail"]
        assert r.headers["retry-after"] == "30"
        assert list(uploads.iterdir()) == []
        assert {r.job_id for r in store.recent(50)} == before


def test_an_api_whose_storage_folder_cannot_be_made_starts_and_refuses_uploads_with_a_503(settings, tmp_path):
    """The storage folder cannot be made (here its parent is a file; a read-only volume, a
    missing permission do the same, and work as root too): the API raised at its start and served
    nothing, not /health, not the results of jobs already run. It now starts, and a submission is
    a 503 in the documented shape that leaves nothing behind, as for a storage that turns
    read-only later."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from shared.jobs import JobStore

    (tmp_path / "a-file").write_text("not a folder")
    changed = settings.model_copy(update={"storage_dir": tmp_path / "a-file" / "uploads",
                                          "queue_name": "audio-gaps-nofolder"})
    store = JobStore.from_settings(changed)
    before = {r.job_id for r in store.recent(50)}
    with TestClient(create_app(changed), raise_server_exceptions=False) as client:
        assert client.get("/health").status_code in (200, 503)
        r = client.post("/jobs/embedding", files={"file": ("a.wav", tone_wav(2.0), "audio/wav")})
    assert r.status_code == 503, r.text
    assert set(r.json()) == {"detail", "error_type", "timestamp"} and r.json()["error_type"] == "ModelError", r.json()
    assert "storage unavailable" in r.json()["detail"] and r.headers["retry-after"] == "30"
    assert {r.job_id for r in store.recent(50)} == before
    assert (tmp_path / "a-file").read_text() == "not a folder"
