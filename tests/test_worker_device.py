"""A worker's device: what a GPU worker is told, and what /health shows when it cannot have it.

This machine has no GPU. The worker below is a real Celery worker process asked for CUDA, which
is the failure a GPU host with a broken driver or a wrong CUDA_VISIBLE_DEVICES gives too. The
index test stands in for a GPU with ``torch.cuda`` patched, and says so; the sticky-failure test
simulates a failed CUDA context in tests/_cuda_fault_worker.py and says so (tests/test_engine_gpu.py
shows, on a GPU, that a real device-side assert is seen as one).
"""

from __future__ import annotations

import os

import pytest


def test_a_worker_that_cannot_have_its_device_says_so_in_health(worker, settings, client, tmp_path):
    from cli.launcher import Stack, wait_until
    from shared.jobs import JobStore

    store = JobStore.from_settings(settings)
    stack = Stack(log_dir=tmp_path)
    # a queue of its own: it must not take the session worker's jobs
    proc = stack.start_worker(queues=["audio-test-no-gpu"], name="no-gpu",
                              env={"AUDIO_ANALYSIS_DEVICE": "cuda"})

    def broken() -> list[dict]:
        return [w for w in store.workers() if w.get("worker", "").startswith("no-gpu@")]

    try:
        # the heartbeat used to build the engine again, fail, and never be written
        wait_until(lambda: bool(broken()), 120, "the no-gpu worker's heartbeat", proc)
        (info,) = broken()
        assert "CUDA is not available" in info["load_error"]
        assert info["diarization_model_loaded"] is False and info["model_device"] is None
        body = client.get("/health").json()
        listed = [w for w in body["workers"] if w["worker"].startswith("no-gpu@")]
        assert listed and "CUDA" in listed[0]["load_error"]
        assert body["diarization_model_loaded"] is True  # the session worker still serves
    finally:
        stack.stop()


@pytest.mark.parametrize("spec,index", [("cuda", 0), ("cuda:0", 0), ("cuda:1", 1)])
def test_a_cuda_device_always_has_its_index(monkeypatch, spec, index):
    """No GPU here: torch.cuda is patched to say two devices are visible. A device without an
    index made torch.cuda.set_per_process_memory_fraction raise, so a GPU worker with a memory
    share (several workers on one card) never built its engine."""
    import torch

    from engine.models.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    device = resolve_device(spec)
    assert device.type == "cuda" and device.index == index
    assert torch.cuda._utils._get_device_index(device) == index  # what the memory share calls


def test_a_cuda_device_that_is_not_visible_is_a_model_error(monkeypatch):
    import torch

    from engine.models.loading import ModelError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ModelError, match="only 1 CUDA device"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="CUDA is not available"):
        resolve_device("cuda")


def test_a_cuda_workers_job_is_measured_before_cuda_is_up():
    """A CUDA worker whose models failed to load before any tensor reached the card (production
    weights missing) has no CUDA context yet. torch's own peak-memory reset raises there
    ("Invalid device argument", as on this machine without a GPU, which is the same state):
    the job failed as an internal error instead of with its ModelError."""
    import torch

    from worker import telemetry

    assert not torch.cuda.is_initialized()
    with telemetry.job("cuda:0") as peak:
        pass
    assert peak["peak_memory_mb"] == 0.0


def _prefork_worker(stack, store, module: str, name: str, queue: str, env: dict[str, str]) -> tuple[object, dict]:
    """``python -m <module>`` as a GPU worker is run (prefork, one pool process) on ``queue``,
    once its pool process has loaded the models; (its process, its heartbeat)."""
    import sys

    from cli.launcher import wait_until

    def ready() -> list[dict]:
        return [w for w in store.workers() if w["worker"].startswith(f"{name}@") and w["diarization_model_loaded"]]

    proc = stack.spawn(name, [
        sys.executable, "-m", module, "--pool", "prefork", "--concurrency", "1",
        "-Q", queue, "-n", f"{name}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ], env=env)
    wait_until(lambda: bool(ready()), 180, f"the {name} worker", proc)
    return proc, ready()[0]


def test_a_sticky_cuda_failure_ends_the_process_and_the_job_runs_again(worker, settings, short_sample, tmp_path):
    """A CUDA context that failed (device-side assert, illegal memory access) fails every later
    call of its process: the job must not be failed and the worker must not go on failing jobs.
    No GPU here: the failure is simulated in tests/_cuda_fault_worker.py, the rest is real."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from cli.launcher import Stack
    from shared.jobs import JobStore
    from tests.conftest import wait_for_job
    from worker.tasks import DEVICE_LOST_EXIT

    queue = "audio-cuda-fault"
    marker = tmp_path / "faulted"
    store = JobStore.from_settings(settings)
    stack = Stack(log_dir=tmp_path)
    try:
        proc, _ = _prefork_worker(stack, store, "tests._cuda_fault_worker", "cudafault", queue,
                                  {"CUDA_FAULT_MARKER": str(marker)})
        local = settings.model_copy(update={"queue_name": queue})
        with TestClient(create_app(local), raise_server_exceptions=False) as client:
            job = client.post("/jobs/diarize", files={"file": (short_sample.name, short_sample.read_bytes(),
                                                               "audio/wav")}).json()
            done = wait_for_job(client, job["job_id"], timeout_s=180)
        assert marker.exists(), "the simulated failure never happened"
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2 and done["result"]["segments_count"] > 0
        faulted = int(marker.read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(faulted, 0)  # the process with the failed context is gone
        log = (tmp_path / "cudafault.log").read_text(errors="replace")
        assert "the CUDA device failed" in log and f"exitcode {DEVICE_LOST_EXIT}" in log
        assert proc.poll() is None, "the worker's main process must survive its child"
    finally:
        stack.stop()


def test_the_prefork_parent_leaves_cuda_to_its_pool_process():
    """A GPU worker runs prefork (compose, Kubernetes, the Dockerfile): its parent imports the
    engine before forking (worker.lifecycle.preimport) and the pool process loads the models onto
    the card. CUDA cannot be used in a child forked after its parent asked CUDA anything, even
    torch.cuda.is_available(): torch then refuses ("Cannot re-initialize CUDA in forked
    subprocess") and every GPU worker would report a load error. Nothing in the engine's import
    or the parent's start-up may touch CUDA. No GPU here, which is a stand-in for one: torch marks
    a fork as bad the same way on a machine without a GPU (checked by the second half)."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    code = textwrap.dedent("""
        import os
        import torch
        import worker.celery_app  # noqa: F401 - the app `celery -A worker.celery_app` imports
        from worker import lifecycle
        lifecycle.preimport()  # the parent's worker_init: imports the engine (torch, pyannote)

        def forked_is_bad() -> bool:
            pid = os.fork()
            if pid == 0:
                os._exit(3 if torch.cuda._is_in_bad_fork() else 0)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3

        print("parent initialised CUDA:", torch.cuda.is_initialized())
        print("child may use CUDA:", not forked_is_bad())
        torch.cuda.is_available()  # what a parent must not do
        print("after asking, child may use CUDA:", not forked_is_bad())
    """)
    env = {**os.environ, "AUDIO_ANALYSIS_DEVICE": "cuda:0", "AUDIO_ANALYSIS_WORKER_LOAD_MODELS": "true",
           "AUDIO_ANALYSIS_WEBHOOK_SECRET": "a-test-secret-that-is-long-enough-0123456789", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert "parent initialised CUDA: False" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "child may use CUDA: True" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "after asking, child may use CUDA: False" in out.stdout, out.stdout + out.stderr[-2000:]


@pytest.fixture(scope="module")
def simulated_gpu_worker(worker, settings, tmp_path_factory):
    """A GPU worker as deployed (prefork, one pool process, ``cuda:0``, a share of the card's
    memory) on a card simulated on the CPU (tests/_simulated_cuda.py, which enforces CUDA's device
    rules: a host tensor next to a card's fails, as ``.numpy()`` of one does), whose diarizations
    run out of GPU memory as many times as the file it is given says (tests/_cuda_oom_worker.py).
    No GPU here, which is what is simulated; the worker, its pool, Redis, the job store, the models
    and the engine are real. Yields (a client of an API on its queue, the file, its log)."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from cli.launcher import Stack
    from shared.jobs import JobStore

    queue = "audio-simulated-cuda"
    logs = tmp_path_factory.mktemp("simulated-gpu-worker")
    count = logs / "ooms"
    count.write_text("0")
    (logs / "probe-kills").write_text("0")
    store = JobStore.from_settings(settings)
    stack = Stack(log_dir=logs)
    try:
        proc, info = _prefork_worker(stack, store, "tests._cuda_oom_worker", "simcuda", queue, {
            "AUDIO_ANALYSIS_DEVICE": "cuda:0", "AUDIO_ANALYSIS_GPU_MEMORY_FRACTION": "0.5", "CUDA_OOM_FILE": str(count),
            "PROBE_KILL_FILE": str(logs / "probe-kills")})
        assert info["model_device"] == "cuda:0" and not info.get("load_error")
        local = settings.model_copy(update={"queue_name": queue})
        with TestClient(create_app(local), raise_server_exceptions=False) as client:
            yield client, count, logs / "simcuda.log"
        assert proc.poll() is None, "the worker's main process must outlive every job"
    finally:
        stack.stop()


def test_a_gpu_worker_runs_jobs_on_its_card(simulated_gpu_worker, short_sample):
    """It warms its models up when it loads them, then takes a diarization and a comparison from
    the queue and answers them on its card."""
    from tests.conftest import wait_for_job

    client, _, log = simulated_gpu_worker
    audio = (short_sample.name, short_sample.read_bytes(), "audio/wav")
    diarized = client.post("/jobs/diarize", files={"file": audio}).json()
    compared = client.post("/jobs/compare", files={"file1": audio, "file2": audio}).json()
    diarized = wait_for_job(client, diarized["job_id"], timeout_s=180)
    compared = wait_for_job(client, compared["job_id"], timeout_s=180)
    assert diarized["status"] == "succeeded", diarized
    assert diarized["result"]["model_device"] == "cuda:0" and diarized["result"]["segments_count"] > 0
    assert compared["status"] == "succeeded", compared
    assert compared["result"]["model_device"] == "cuda:0"
    assert compared["result"]["similarity_score"] > 0.99  # the same recording twice
    text = log.read_text(errors="replace")
    assert "models warmed up on cuda:0" in text and "models loaded on cuda:0" in text, text[-3000:]


def test_a_job_that_finds_the_gpu_out_of_memory_runs_again_when_there_is_room(simulated_gpu_worker, settings,
                                                                            short_sample):
    """Workers sharing a card (compose's shared-gpu profile) or a neighbour's peak can leave a job
    without GPU memory where no batch can be halved; that failed as an internal error. It goes
    back to the queue as a lost attempt now, and fails as the service's state (503) once it has
    run out job_max_attempts times. The running out is raised by tests/_cuda_oom_worker.py
    (torch's own OutOfMemoryError)."""
    from tests.conftest import wait_for_job

    client, count, _ = simulated_gpu_worker
    audio = (short_sample.name, short_sample.read_bytes(), "audio/wav")
    try:
        count.write_text("1")
        once = wait_for_job(client, client.post("/jobs/diarize", files={"file": audio}).json()["job_id"],
                            timeout_s=180)
        assert once["status"] == "succeeded", (once.get("error"), once.get("attempts"))
        assert once["attempts"] == 2 and once["result"]["segments_count"] > 0
        count.write_text("100")
        always = wait_for_job(client, client.post("/jobs/diarize", files={"file": audio}).json()["job_id"],
                              timeout_s=180)
        assert always["status"] == "failed", always
        assert always["attempts"] == settings.job_max_attempts
        assert always["error"]["status_code"] == 503 and "no memory left" in always["error"]["detail"], always
        assert int(count.read_text()) == 100 - settings.job_max_attempts  # each attempt ran once
    finally:
        count.write_text("0")


def test_a_job_whose_header_check_is_killed_by_the_system_runs_again(simulated_gpu_worker, settings):
    """A reader of the header check killed from outside (an OOM killer on a full host), one that
    could not start, or one starved of CPU is the host's state at that moment, not the file's: the
    job failed for good with a 503 ("retry later") at the first such moment. It goes back to the
    queue as a lost attempt now, as a job short of GPU memory does, and fails 503 once that has
    happened job_max_attempts times. The kill is sent by tests/_probe_faults.py (nothing here makes
    the OOM killer pick a process); the sandbox, its child and the worker are real."""
    from tests.conftest import wait_for_job
    from tests.test_probe_sandbox import _encode

    client, _, log = simulated_gpu_worker
    kills = log.parent / "probe-kills"
    # AAC in MP4: FFmpeg alone reads its header, so the worker's check runs in the sandbox
    audio = ("tone.m4a", _encode("mp4", "aac", seconds=3.0), "audio/mp4")
    try:
        kills.write_text("1")
        once = wait_for_job(client, client.post("/jobs/diarize", files={"file": audio}).json()["job_id"],
                            timeout_s=180)
        assert once["status"] == "succeeded", (once.get("error"), once.get("attempts"))
        assert once["attempts"] == 2 and int(kills.read_text()) == 0
        kills.write_text("100")
        always = wait_for_job(client, client.post("/jobs/diarize", files={"file": audio}).json()["job_id"],
                              timeout_s=180)
        assert always["status"] == "failed", always
        assert always["attempts"] == settings.job_max_attempts
        assert always["error"]["status_code"] == 503, always
        assert "header check could not run" in always["error"]["detail"], always
        assert "killed by the system" in always["error"]["detail"], always
        assert int(kills.read_text()) == 100 - settings.job_max_attempts  # each attempt read it once
    finally:
        kills.write_text("0")
