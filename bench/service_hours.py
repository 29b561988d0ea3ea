"""Hour-long recordings through the whole service: from the end of each upload to its result, and
audio-hours per device-hour when several queue up, with one worker and with two sharing the device.

    .venv/bin/python bench/service_hours.py --minutes 60 --jobs 3 --workers 1 2 --device cuda
    .venv/bin/python bench/service_hours.py --minutes 5 --jobs 2 --workers 1 --device cpu   # rehearsal

Each configuration gets a fresh local service (``_local.local_service``: uvicorn API, Celery
workers, Redis) and one warm-up job per worker (a minute of speech) before the clock starts: a
worker holds its models loaded, and the first job on a CUDA device pays for its kernels' set-up.
Then the client uploads ``--jobs`` copies of the recording back to back (a queue of hour-long
jobs) and polls every 50 ms. Per job it prints the time from the end of its upload to the poll
that saw the result, and the worker's own ``processing_time``; over the queue, audio-hours per
hour of wall time from the first upload to the last result, which for one device is
audio-hours per device-hour. The recording is ``evaluation.longform.long_conversation`` (real
speech of four talkers), written as 16 kHz 16-bit WAV, so each job also decodes its file.

On a CUDA device it also samples the card's utilisation (NVML, every 100 ms) from the first upload
to the last result: whether queued hours keep the card busy, or leave it idle while a worker
decodes its next file and clusters on the CPU. A SIGTERM (the device check's step limit) stops
the local service's processes before exiting: they run in sessions of their own, and left
behind, its workers kept their GPU memory and cores through the steps after it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

from _local import local_service, minute_of_speech

TERMINAL = ("succeeded", "failed", "cancelled")


def _submit(http: httpx.Client, path: Path) -> str:
    with path.open("rb") as f:
        response = http.post("/jobs/diarize", files={"file": (path.name, f, "audio/wav")})
    response.raise_for_status()
    return response.json()["job_id"]


def _wait_all(http: httpx.Client, job_ids: list[str], timeout_s: float) -> dict[str, tuple[float, dict]]:
    """job id -> (the monotonic time its end was seen, its record)."""
    done: dict[str, tuple[float, dict]] = {}
    deadline = time.monotonic() + timeout_s
    while len(done) < len(job_ids) and time.monotonic() < deadline:
        for job_id in job_ids:
            if job_id in done:
                continue
            record = http.get(f"/jobs/{job_id}").json()
            if record["status"] in TERMINAL:
                done[job_id] = (time.monotonic(), record)
        time.sleep(0.05)
    return done


class GpuBusy:
    """The card's utilisation sampled every ``interval_s`` while open (NVML; nothing without it)."""

    def __init__(self, device: str, interval_s: float = 0.1) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = None
        if not device.startswith("cuda"):
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = int(device.split(":", 1)[1]) if ":" in device else 0
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # noqa: BLE001 - no NVML: the figure is left out
            print(f"  (no GPU utilisation: {type(exc).__name__}: {exc})")
            return
        self._interval = interval_s

    def __enter__(self) -> "GpuBusy":
        if self._handle is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        import pynvml

        while not self._stop.wait(self._interval):
            try:
                self.samples.append(int(pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
            except Exception:  # noqa: BLE001
                return

    def summary(self) -> str:
        if not self.samples:
            return ""
        busy = sum(1 for u in self.samples if u > 0) / len(self.samples)
        return (f"; GPU utilisation mean {sum(self.samples) / len(self.samples):.0f} %, "
                f"busy (> 0 %) in {100 * busy:.0f} % of {len(self.samples)} samples")


def run(recording: Path, audio_s: float, jobs: int, workers: int, device: str, timeout_s: float) -> None:
    env = {"AUDIO_ANALYSIS_DEVICE": device}
    with local_service(with_worker=True, workers=workers, worker_env=env) as base, \
            httpx.Client(base_url=base, timeout=120) as http:
        warm = minute_of_speech(recording.parent)
        ids = [_submit(http, warm) for _ in range(workers)]
        _wait_all(http, ids, timeout_s)
        started = time.monotonic()
        uploaded: dict[str, float] = {}
        with GpuBusy(device) as gpu:
            for _ in range(jobs):
                job_id = _submit(http, recording)
                uploaded[job_id] = time.monotonic()
            done = _wait_all(http, list(uploaded), timeout_s)
        wall = (max(t for t, _ in done.values()) if done else time.monotonic()) - started
        print(f"\n{workers} worker(s) on {device}, {jobs} queued jobs of {audio_s / 60:.0f} min:")
        for n, (job_id, t_up) in enumerate(uploaded.items(), 1):
            if job_id not in done:
                print(f"  job {n}: no result within {timeout_s:.0f} s")
                continue
            t_end, record = done[job_id]
            result = record.get("result") or {}
            print(f"  job {n}: {record['status']}, upload ended at +{t_up - started:.1f} s, result "
                  f"{t_end - t_up:.1f} s after its upload; worker processing_time "
                  f"{result.get('processing_time', float('nan')):.1f} s on {result.get('model_device')}")
        succeeded = sum(1 for _, r in done.values() if r["status"] == "succeeded")
        print(f"  queue: {succeeded}/{jobs} succeeded in {wall:.1f} s wall -> "
              f"{succeeded * audio_s / max(wall, 1e-9):.0f} audio-hours per {device}-hour{gpu.summary()}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="auto", help="AUDIO_ANALYSIS_DEVICE for the workers")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for a queue's results")
    args = parser.parse_args()
    # SIGTERM as an exception: the local service's context stops its processes on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from evaluation.longform import long_conversation

    with tempfile.TemporaryDirectory(prefix="aa-hours-") as tmp:
        samples, _ = long_conversation(args.minutes)
        recording = Path(tmp) / f"conversation_{args.minutes:g}min.wav"
        sf.write(recording, np.asarray(samples, dtype=np.float32), 16000, subtype="PCM_16")
        del samples
        audio_s = sf.info(recording).duration
        for workers in args.workers:
            run(recording, audio_s, args.jobs, workers, args.device, args.timeout)


if __name__ == "__main__":
    main()
