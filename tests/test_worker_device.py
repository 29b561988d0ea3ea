"""A worker's device: what a GPU worker is told, and what /health shows when it cannot have it.

This machine has no GPU. The worker below is a real Celery worker process asked for CUDA, which
is the failure a GPU host with a broken driver or a wrong CUDA_VISIBLE_DEVICES gives too. The
index test stands in for a GPU with ``torch.cuda`` patched, and says so.
"""

from __future__ import annotations

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
