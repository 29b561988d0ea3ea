"""What a worker process reports about itself and its device, and each job's peak memory.

Published with the heartbeat the worker already writes to Redis every few seconds (no port per
worker process to scrape, no service discovery: a GPU host may run several workers, each in its
own container), and exposed by every API replica's ``/metrics`` (api/metrics.py), labelled by
worker and device. GPU figures come from NVML (nvidia-ml-py talks to the driver, no CUDA context
needed); on a machine without a GPU they are simply absent.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import psutil

log = logging.getLogger(__name__)

_process = psutil.Process()
_lock = threading.Lock()
_counters: dict[str, Any] = {"jobs_running": 0, "jobs_done": 0, "model_load_s": None}


def set_model_load_time(seconds: float) -> None:
    _counters["model_load_s"] = round(seconds, 3)


def sample(device: str | None) -> dict[str, Any]:
    """One reading for the heartbeat (cheap: a few /proc reads and, on a GPU, two NVML calls)."""
    with _process.oneshot():
        info: dict[str, Any] = {
            "rss_bytes": _process.memory_info().rss,
            # since the previous call (the heartbeat interval): 100 = one core busy
            "cpu_percent": _process.cpu_percent(None),
        }
    info.update(_counters)
    if device and device.startswith("cuda"):
        info.update(_gpu(device))
    return info


@functools.lru_cache(maxsize=None)
def _nvml_handle(index: int) -> Any:
    """NVML's handle of the card torch calls ``cuda:<index>``, looked up once per process."""
    import pynvml
    import torch

    pynvml.nvmlInit()
    # NVML numbers the physical cards; CUDA_VISIBLE_DEVICES renumbers them for torch: the card's
    # UUID is the same in both
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)


def _gpu(device: str) -> dict[str, Any]:
    try:
        import pynvml
        import torch

        index = int(device.split(":", 1)[1]) if ":" in device else 0
        handle = _nvml_handle(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {
            "gpu_utilization_percent": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "gpu_memory_used_bytes": int(memory.used),
            "gpu_memory_total_bytes": int(memory.total),
            "gpu_torch_allocated_bytes": int(torch.cuda.memory_allocated(index)),
        }
    except Exception:  # noqa: BLE001 - no driver, no NVML: the GPU series are absent
        log.debug("no GPU reading", exc_info=True)
        return {}


def reset_peak_rss() -> bool:
    # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS,
    # so each job's peak is its own and not the model loading's
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM, the high-water mark of its own memory map (reset by
    ``reset_peak_rss``). Not ``ru_maxrss`` where there is a choice: Linux carries the RSS of the
    image a process replaced at exec into it, so a spawned child's ru_maxrss can be its parent's."""
    try:
        with open(f"/proc/{os.getpid()}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def job(device: str | None) -> Iterator[dict[str, float | None]]:
    """Counts the running job and measures its peak memory: torch's peak allocation on a GPU,
    the process's peak resident memory on the CPU. Yields a dict filled in on exit."""
    peak: dict[str, float | None] = {"peak_memory_mb": None}
    cuda = bool(device and device.startswith("cuda"))
    if cuda:
        import torch

        # only once CUDA is up: before (a worker whose models failed to load before any tensor
        # reached the card) torch raises "Invalid device argument" here, and the job failed as
        # an internal error instead of with its ModelError; the peak then reads 0
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    with _lock:
        _counters["jobs_running"] += 1
    try:
        yield peak
    finally:
        with _lock:
            _counters["jobs_running"] -= 1
            _counters["jobs_done"] += 1
        if cuda:
            import torch

            peak["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        else:
            peak["peak_memory_mb"] = round(peak_rss_bytes() / 2**20, 1)
